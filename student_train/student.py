"""Loading the student: a local model (its weights are the init), a config (random init) or some of a teacher's
layers (`--init-from-teacher`), plus its tokenizer.

The store's targets are token ids, so the student's tokenizer is the teacher's: a config-only student takes it from
the teacher directory named in the store's manifest, and the fingerprints are compared before training. A student
with another tokenizer (`--student-tokenizer`, or one saved with the student) trains through the character alignment
of `student_train.cross_tokenizer`, which decides whether the two can be aligned.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from storage.conversations import template_sha256, tokenizer_template
from storage.identity import tokenizer_fingerprint
from storage.manifest import Manifest
from student_train.checkpoint import latest_checkpoint
from student_train.init_student import select_layers

if TYPE_CHECKING:
    from student_train.config import TrainConfig

log = logging.getLogger(__name__)

# Architectures that transform logits after the output head; the sparse losses apply the head alone.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def student_tokenizer(config: TrainConfig, manifest: Manifest):
    """The student's tokenizer: `--student-tokenizer`, else the one saved with `--student`, else the store's
    teacher's (a config-only student, `--init-from-teacher`).

    Raises:
        ValueError: a path that does not exist, or `--student-tokenizer` with `--init-from-teacher`.
    """
    source = config.student or config.init_from_teacher
    path = Path(source).expanduser()
    if config.student and not path.exists():
        raise ValueError(f"--student {source}: no such file or directory; pass a model directory or a config.json.")
    if config.student_tokenizer is None:
        return load_tokenizer(path.parent if path.is_file() else path, manifest)
    if config.init_from_teacher:
        raise ValueError(f"--student-tokenizer {config.student_tokenizer} and --init-from-teacher: the teacher's "
                         "layers read the teacher's token ids; leave --student-tokenizer out, or give a --student "
                         "model with that tokenizer's vocabulary.")
    tokenizer_dir = Path(config.student_tokenizer).expanduser()
    if not ((tokenizer_dir / "tokenizer.json").exists() or (tokenizer_dir / "tokenizer_config.json").exists()):
        raise ValueError(f"--student-tokenizer {config.student_tokenizer}: no tokenizer there (tokenizer.json or "
                         "tokenizer_config.json); pass a local directory saved with tokenizer.save_pretrained.")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_student(config: TrainConfig, manifest: Manifest, tokenizer, *, cross: bool = False):
    """(model in fp32, tokenizer) a run starts from: `--student`, or layers of `--init-from-teacher`.

    `tokenizer` is the student's (`student_tokenizer`); with `cross`, it is not the store's and trains through the
    character alignment, so only the student's vocabulary is checked against it. A resumed run of
    `--init-from-teacher` takes its student from the newest checkpoint, whose weights replace the init anyway: the
    teacher's weights are not read again, only its tokenizer (or the store's teacher's, if it is gone).
    """
    if config.init_from_teacher is None:
        model = load_student(config.student, manifest, tokenizer, seed=config.seed, cross=cross)
    elif not config.resume:
        model, tokenizer = init_from_teacher(config.init_from_teacher, config.keep_layers, manifest)
    else:
        model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(Path(config.output)) / "model",
                                                     dtype=torch.float32)
        tokenizer = load_tokenizer(Path(config.init_from_teacher).expanduser(), manifest)
        _check(model, tokenizer, manifest, config.init_from_teacher)
    if not cross:  # across tokenizers, the student's template is its own: the alignment keeps the store's turns
        check_chat_template(tokenizer, manifest, config.init_from_teacher or config.student,
                            allow=config.allow_chat_template_mismatch)
    return model, tokenizer


def init_from_teacher(teacher: str, keep_layers: list[int] | None, manifest: Manifest):
    """(model in fp32, tokenizer): the teacher's layers `keep_layers` (None: 0, 2, 4, ...), checked against the store.

    Raises:
        ValueError: no teacher directory, a tokenizer other than the store's, an unsupported architecture or a bad
            list of layers.
    """
    path = Path(teacher).expanduser()
    if not path.is_dir():
        raise ValueError(f"--init-from-teacher {teacher}: no such directory; pass the teacher's local HF model "
                         "directory.")
    tokenizer = load_tokenizer(path, manifest)
    problems = compatibility_problems(tokenizer, AutoConfig.from_pretrained(path).vocab_size, manifest, teacher)
    if problems:  # before reading the teacher's weights
        raise ValueError("\n".join(problems))
    layers = "every other" if keep_layers is None else ",".join(map(str, keep_layers))
    teacher_model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")  # only the kept part becomes fp32
    try:
        model = select_layers(teacher_model, keep_layers).float()
    except ValueError as exc:
        raise ValueError(f"--init-from-teacher {teacher} --keep-layers {layers}: {exc}") from None
    _check(model, tokenizer, manifest, teacher)
    before, after = teacher_model.num_parameters(), model.num_parameters()
    log.info("student: layers %s of %s, %d of its %d; %.2fM of its %.2fM parameters, %.2fx smaller", layers, teacher,
             model.config.num_hidden_layers, teacher_model.config.num_hidden_layers, after / 1e6, before / 1e6,
             before / after)
    return model, tokenizer


def load_student(student: str, manifest: Manifest, tokenizer, *, seed: int, cross: bool = False):
    """The model (fp32) of `student`, checked against the store and the student's `tokenizer`.

    Raises:
        ValueError: a tokenizer other than the teacher's (unless `cross`), a vocabulary smaller than the tokenizer
            whose ids it reads, or an architecture with logit post-processing.
    """
    path = Path(student).expanduser()
    has_weights = path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES)
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        log.info("student: random init from %s (%.1fM parameters)", path, model.num_parameters() / 1e6)
    _check(model, tokenizer, manifest, student, cross=cross)
    return model


def load_tokenizer(config_dir: Path, manifest: Manifest):
    """The student's tokenizer, or the teacher's when the student directory has none.

    The teacher of an ensemble store is a list of `members` that share one tokenizer: the first member whose
    directory exists gives it.
    """
    if (config_dir / "tokenizer_config.json").exists() or (config_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(config_dir)
    dirs = [Path(m["model"]) for m in manifest.teacher.get("members", [])] or [Path(manifest.teacher["model"])]
    teacher_dir = next((d for d in dirs if d.is_dir()), dirs[0])
    if not teacher_dir.is_dir():
        raise ValueError(
            f"the student at {config_dir} has no tokenizer and the store's teacher directory {teacher_dir} is gone; "
            "save the teacher's tokenizer beside the student's config."
        )
    log.info("student: using the teacher's tokenizer from %s", teacher_dir)
    return AutoTokenizer.from_pretrained(teacher_dir)


def _check(model, tokenizer, manifest: Manifest, student: str, *, cross: bool = False) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if cross:
        problems = [] if vocab >= len(tokenizer) else [
            f"vocab size mismatch: the student {student} predicts {vocab} ids and its tokenizer has {len(tokenizer)} "
            f"tokens. Resize the student's embeddings to at least {len(tokenizer)}."]
    else:
        problems = compatibility_problems(tokenizer, vocab, manifest, student)
    post = [name for name in LOGIT_POSTPROCESSING if getattr(model.config, name, None) is not None]
    if post:
        problems.append(f"student {student} post-processes its logits ({', '.join(post)}), which the sparse "
                        "losses do not reproduce yet; choose another student architecture.")
    if problems:
        raise ValueError("\n".join(problems))


def chat_template_problem(tokenizer, manifest: Manifest, student: str) -> str | None:
    """Why a student with this tokenizer would be prompted otherwise than the store's conversations were laid out:
    its chat template differs from the one the store was rendered with (`dataset.chat_template_sha256`); None when
    they agree or the store holds text."""
    stored = manifest.dataset.get("chat_template_sha256")
    template = tokenizer_template(tokenizer)
    found = template_sha256(template) if template is not None else None
    if stored is None or found == stored:
        return None
    return (f"chat template mismatch: the store's conversations were rendered with the template of sha256 "
            f"{stored[:12]} (from {manifest.teacher['model']} or its --chat-template), the student {student}'s "
            f"tokenizer has {'no chat template' if found is None else f'one of sha256 {found[:12]}'}. Save that "
            "template in the student's tokenizer (tokenizer.chat_template, then save_pretrained), or pass "
            "--allow-chat-template-mismatch to train anyway.")


def check_chat_template(tokenizer, manifest: Manifest, student: str, *, allow: bool) -> None:
    """Refuse a student whose chat template differs from the store's (`chat_template_problem`), or warn when allowed.

    Raises:
        ValueError: they differ and `allow` is off.
    """
    problem = chat_template_problem(tokenizer, manifest, student)
    if problem is not None and not allow:
        raise ValueError(problem)
    if problem is not None:
        log.warning("%s", problem.replace(" or pass --allow-chat-template-mismatch to train anyway", ""))


def compatibility_problems(tokenizer, vocab_size: int, manifest: Manifest, student: str,
                           role: str = "student") -> list[str]:
    """What stops a model with this tokenizer and output vocabulary from working with the store's token ids.

    Args:
        role: what the model is to the run, as the messages name it: "student" (it learns the store's targets) or
            "online teacher" (it replaces them; the trainer also requires its vocabulary to be the store's).
    """
    teacher = manifest.teacher
    problems = []
    found = tokenizer_fingerprint(tokenizer)
    if found != teacher["tokenizer_sha256"]:
        fix = ("Use a student with the teacher's tokenizer." if role == "student" else
               f"Use the teacher that built the store, or an {role} with its tokenizer.")
        problems.append(
            f"tokenizer mismatch: the store was built with {teacher['model']}'s tokenizer "
            f"({teacher['tokenizer_vocab_size']} tokens, sha256 {teacher['tokenizer_sha256'][:12]}), the {role} "
            f"{student} has {len(tokenizer)} tokens (sha256 {found[:12]}). {fix}"
        )
    if vocab_size < teacher["vocab_size"]:
        fix = (f"Resize the student's embeddings to at least {teacher['vocab_size']}." if role == "student" else
               "Use the teacher that built the store.")
        problems.append(
            f"vocab size mismatch: the {role} {student} predicts {vocab_size} ids, the teacher's targets use "
            f"{teacher['vocab_size']}. {fix}"
        )
    return problems
