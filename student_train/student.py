"""Loading the student: a local model (its weights are the init) or a config (random init), plus its tokenizer.

The tokenizer must be the teacher's: the store's targets are token ids. A config-only student takes the tokenizer
from the teacher directory named in the store's manifest; either way the fingerprints are compared before
training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from storage.identity import tokenizer_fingerprint
from storage.manifest import Manifest

log = logging.getLogger(__name__)

# Architectures that transform logits after the output head; the sparse losses apply the head alone.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def load_student(student: str, manifest: Manifest, *, seed: int):
    """(model in fp32, tokenizer) for `student`, checked against the store.

    Raises:
        ValueError: missing path, a tokenizer other than the teacher's, a vocabulary smaller than the teacher's
            tokenizer, or an architecture with logit post-processing.
    """
    path = Path(student).expanduser()
    if not path.exists():
        raise ValueError(f"--student {student}: no such file or directory; pass a model directory or a config.json.")
    config_dir = path.parent if path.is_file() else path
    has_weights = path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES)
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        log.info("student: random init from %s (%.1fM parameters)", path, model.num_parameters() / 1e6)
    tokenizer = load_tokenizer(config_dir, manifest)
    _check(model, tokenizer, manifest, student)
    return model, tokenizer


def load_tokenizer(config_dir: Path, manifest: Manifest):
    """The student's tokenizer, or the teacher's when the student directory has none."""
    if (config_dir / "tokenizer_config.json").exists() or (config_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(config_dir)
    teacher_dir = Path(manifest.teacher["model"])
    if not teacher_dir.is_dir():
        raise ValueError(
            f"the student at {config_dir} has no tokenizer and the store's teacher directory {teacher_dir} is gone; "
            "save the teacher's tokenizer beside the student's config."
        )
    log.info("student: using the teacher's tokenizer from %s", teacher_dir)
    return AutoTokenizer.from_pretrained(teacher_dir)


def _check(model, tokenizer, manifest: Manifest, student: str) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    problems = compatibility_problems(tokenizer, vocab, manifest, student)
    post = [name for name in LOGIT_POSTPROCESSING if getattr(model.config, name, None) is not None]
    if post:
        problems.append(f"student {student} post-processes its logits ({', '.join(post)}), which the sparse "
                        "losses do not reproduce yet; choose another student architecture.")
    if problems:
        raise ValueError("\n".join(problems))


def compatibility_problems(tokenizer, vocab_size: int, manifest: Manifest, student: str) -> list[str]:
    """What stops a student with this tokenizer and output vocabulary from learning the store's targets."""
    teacher = manifest.teacher
    problems = []
    found = tokenizer_fingerprint(tokenizer)
    if found != teacher["tokenizer_sha256"]:
        problems.append(
            f"tokenizer mismatch: the store was built with {teacher['model']}'s tokenizer "
            f"({teacher['tokenizer_vocab_size']} tokens, sha256 {teacher['tokenizer_sha256'][:12]}), the student "
            f"{student} has {len(tokenizer)} tokens (sha256 {found[:12]}). Use a student with the teacher's tokenizer."
        )
    if vocab_size < teacher["vocab_size"]:
        problems.append(
            f"vocab size mismatch: the student {student} predicts {vocab_size} ids, the teacher's targets use "
            f"{teacher['vocab_size']}. Resize the student's embeddings to at least {teacher['vocab_size']}."
        )
    return problems
