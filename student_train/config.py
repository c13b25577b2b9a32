"""`TrainConfig`: every option of `student-train`, declared once (help, default, flag) and checked where it is
made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from storage.options import option
from student_train.divergences import ONLINE, REPRESENTATIONS, TARGETS_FROM
from student_train.features import FEATURE_LOSSES, PROJECTIONS, parse_layer_map
from student_train.liger import FUSED_CE
from student_train.loss_config import CE, LOSS_IMPLS, LOSS_NAMES, ROLLOUT, SCHEDULES, LossConfig

PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("ddp", "fsdp")
DEFAULT_ALPHA = 0.9


@dataclass(kw_only=True)
class TrainConfig:
    """Options of one student training run (`student-train`): each field's help says what it does."""

    store: str = option(help="Store written by `teacher-cache build`.")
    student: str | None = option(
        None, help="Student: a local HF model directory (weights are the init) or an HF config (config.json, or a "
                   "directory with only one) for a random init. Not with --init-from-teacher.")
    output: str = option(help="Run directory: checkpoints, metrics.jsonl and the final student.")
    student_tokenizer: str | None = option(
        None, metavar="DIR",
        help="The student's tokenizer (a local HF tokenizer directory). Default: the one saved with --student, else "
             "the store's teacher's. When it is not the store's, the cross-tokenizer path runs: each sample's text "
             "is recovered from the teacher's ids, tokenized with this tokenizer, and aligned with the teacher's "
             "tokens on shared character boundaries; the divergences then compare chunks, mapped or sorted "
             "targets (--targets-from). Byte-level BPE and sentencepiece tokenizers align. See "
             "student_train/cross_tokenizer.py.")
    teacher_tokenizer: str | None = option(
        None, metavar="DIR",
        help="With a student tokenizer other than the store's: where the store's teacher tokenizer is (default: the "
             "teacher directory the manifest names); it must be the one the store was built with.")
    mix: list[str] | str = option(
        default_factory=list, multiple=True, metavar="STORE=WEIGHT",
        help="Another store to train on, repeatable: WEIGHT in (0, 1) is the share of micro-batches drawn from "
             "STORE, each micro-batch whole from one store (in a fixed order, the same on every rank); --store gets "
             "the rest, 1 - the sum of the weights, which must stay above 0. On-policy distillation (GKD): with the "
             "student's own rollouts scored by the teacher as --store, 1 - the sum is the on-policy share (GKD's "
             "lambda), e.g. --store /cache/rollouts --mix /cache/teacher-answers=0.5. The mixed stores need the "
             "tokenizer, vocabulary and --seq-len of --store and the targets the loss reads (rollout_rkl adds 0 "
             "on a store without rollouts); they are read whole, with their own order and epochs, while an epoch "
             "is one pass over --store. In a file also a mapping {STORE: WEIGHT}. See student_train/mixture_loader.py.")
    loss: list[str] | str = option(
        default_factory=list, multiple=True, metavar="NAME=WEIGHT",
        help=f"A loss term, repeatable; NAME is one of {', '.join(LOSS_NAMES)} (the menu above). Default: "
             f"forward_kl=ALPHA ce=1-ALPHA. A bare {'/'.join(REPRESENTATIONS)} is --targets-from. In a file also "
             "a mapping {NAME: WEIGHT}. Resolved to the weighted terms alone, zero weights dropped. "
             f"{ROLLOUT} trains on a store built over this student's own rollouts (see --rollout-clip).")
    targets_from: str | None = option(
        None, choices=tuple(TARGETS_FROM),
        help="What the divergences compare with. Default: hybrid (exact top-k plus draws from the tail) when the "
             "store's draws are of the teacher's tail, else topk_tail (top-k plus a tail bucket) when the store has "
             "top-k targets, else sampled. topk_residual gives the tail mass to the true next token (a biased "
             "baseline); topk_renorm is biased, offered for comparison. online: the full distribution of "
             "--online-teacher (implied by it). See student_train/divergences.py.")
    top_k: int | None = option(
        None, metavar="K",
        help="With topk_tail, topk_renorm or topk_residual: use only the K most probable of the store's top-k ids "
             "(the others' mass joins the tail), e.g. top-8 from a top-64 store. Not with hybrid, whose tail draws "
             "are conditioned on the stored top-k. Default: all of them.")
    online_teacher: str | None = option(
        None, metavar="DIR",
        help="Online full-logit KD, the baseline for cached targets: run this teacher (a local HF model with the "
             "store's tokenizer and vocabulary) beside the student, frozen (bf16 under bf16 autocast), and compare "
             "with its full distribution, a chunk of positions at a time, instead of the store's targets. The store "
             "still gives the token ids; held-out KL still uses its targets. The teacher is not saved; --resume "
             "loads it again. See student_train/online_teacher.py.")
    alpha: float | None = option(
        None, help=f"KD weight of the default loss when --loss gives no weights (default {DEFAULT_ALPHA}): "
                   "forward_kl=ALPHA ce=1-ALPHA; 0 trains with CE only. Resolved into --loss.")
    temperature: float = option(LossConfig.temperature,
                                help="Softening of both distributions in the divergences, with the T^2 factor (must "
                                     "be 1 for sampled and hybrid targets).")
    chunk_temperature: float = option(
        LossConfig.chunk_temperature, metavar="TAU",
        help="With --targets-from chunks: the divergences compare the chunk likelihoods p^(1/TAU) of teacher and "
             "student (approximate likelihood matching), times TAU; large TAU compares log-likelihood ratios.")
    jsd_beta: float = option(LossConfig.jsd_beta, help="jsd's beta in (0, 1): the teacher's share of the mixture.")
    skew_alpha: float = option(LossConfig.skew_alpha, help="skew_kl's and skew_rkl's alpha in (0, 1).")
    kd_schedule: str = option(
        LossConfig.kd_schedule, metavar="SCHEDULE",
        help=f"Factor on the divergences and {ROLLOUT} by step: {', '.join(SCHEDULES)} (0 -> 1 over STEPS; 1 -> 0 "
             "over STEPS). CE is not scheduled.")
    rollout_clip: float = option(
        LossConfig.rollout_clip, metavar="C",
        help=f"{ROLLOUT}'s truncation (>= 1) of its importance weights min(q(x) / mu(x), C): q the student now, mu "
             "the distribution it sampled the token x from when it generated the rollouts, so that the estimate "
             "follows the student's drift since, with bounded variance.")
    feature_loss: str | None = option(
        None, choices=tuple(FEATURE_LOSSES),
        help="Also pull the student's hidden states towards the teacher's stored by `teacher-cache build "
             "--hidden-layers`: mse or cosine (1 - cos). Default: off. See student_train/features.py.")
    feature_weight: float = option(1.0, help="Weight of --feature-loss in the total (not scheduled).")
    feature_layers: list[list[int]] | str | None = option(
        None, metavar="S:T,...",
        help="Student hidden-state index : teacher index as stored (0 = embeddings, -1 = last), e.g. 2:4,4:8; in a "
             "file also a list of pairs. Default: each stored teacher layer with the student layer at the same "
             "relative depth.")
    feature_projection: str = option(
        "auto", choices=PROJECTIONS,
        help="A learned linear map from each student layer to the teacher's width: auto = when the widths differ. "
             "It trains with the student and is kept in checkpoints, not in the saved student.")
    batch_size: int = option(8, help="Samples per micro-batch (per process under torchrun).")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    lr: float = option(1e-3, help="Peak learning rate (AdamW).")
    weight_decay: float = option(0.1, help="AdamW weight decay.")
    warmup_steps: int | None = option(None, help="Linear warmup steps. Default: 10% of the run, at most 100.")
    min_lr_fraction: float = option(0.1, help="The cosine decay after the warmup ends at this fraction of --lr.")
    max_steps: int | None = option(None, help="Optimizer steps. Default: --epochs passes over the data.")
    epochs: float = option(1.0, help="Passes over the training samples when --max-steps is not given.")
    clip_grad: float = option(1.0, help="Gradient-norm clip (0: off).")
    precision: str = option("auto", choices=PRECISIONS, help="auto = bf16 autocast on CUDA, fp32 on CPU.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    eval_fraction: float = option(0.05, help="Share of the store (its last samples) held out for evaluation.")
    eval_store: str | None = option(None, help="A separate store to evaluate on (instead of --eval-fraction).")
    eval_every: int = option(200, help="Evaluate every N steps (and at the end).")
    save_every: int = option(500, help="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = option(2, help="The most recent checkpoints kept; older ones are deleted.")
    log_every: int = option(10, help="Write metrics every N steps.")
    chunk_positions: int = option(256, help="Positions whose student logits exist at once in the loss (memory vs "
                                            "speed).")
    fused_ce: str = option(
        "auto", choices=FUSED_CE,
        help="A loss of CE alone on CUDA: auto = Liger-kernel's fused linear cross-entropy when installed (pip "
             "install liger-kernel), else the torch path; liger = require it (an error where it cannot run); torch = "
             "never. Same loss and gradients either way; see student_train/liger.py.")
    loss_impl: str = option(
        "fused", choices=LOSS_IMPLS,
        help="How the loss applies the head, a chunk of positions at a time: fused = each chunk's logits computed "
             "once, their gradient built in the forward pass from a few values per position (log-normaliser, logits "
             "at the target ids) and kept until backward as the gradients of the hidden states and head; checkpoint "
             "= activation checkpointing, the logits computed again in backward (slower; the reference). Same loss "
             "and gradients. Online KD always uses checkpoint. See student_train/fused_loss.py.")
    allow_chat_template_mismatch: bool = option(
        False, help="Train on a store of conversations although the student's tokenizer renders chats with another "
                    "template than the one the store was built with (a warning instead of an error): the student "
                    "would then learn turns laid out differently from how it will be prompted.")
    seed: int = option(0, help="Seed of the data order and of a random student init.")
    num_workers: int = option(0, help="Loader worker processes.")
    verify: bool = option(
        True, help="Check every store file against its SHA-256 in the manifest before its first read (a damaged store "
                   "is an error, not wrong targets). --no-verify skips the hashing; files are still checked for "
                   "presence and size.")
    distributed: str = option(
        "ddp", choices=DISTRIBUTED,
        help="Under torchrun: ddp (each GPU holds the whole student) or fsdp (FSDP2: parameters, gradients and "
             "optimizer states sharded over the GPUs). Unused in a single process.")
    selection: str | None = option(None, help="Train on exactly the sample ids of this JSON file, in its order.")
    resume: bool = option(False, help="Continue from the newest checkpoint in --output.")
    init_from_teacher: str | None = option(
        None, help="Instead of --student: a local HF teacher directory (same tokenizer as the store) whose layers "
                   "--keep-layers, with its embeddings, final norm and head, are the student (the DistilBERT recipe; "
                   "see student_train/init_student.py).")
    keep_layers: list[int] | str | None = option(
        None, metavar="I,J,...",
        help="The teacher's layers kept by --init-from-teacher, e.g. 0,2,4 or 0,-1 (negative: from the end); in a "
             "file also a list. Default: every other layer from 0.")

    def __post_init__(self) -> None:
        terms = [self.loss] if isinstance(self.loss, str) else list(self.loss)  # one term may come as a string
        self.loss, self.targets_from = _resolve_loss(terms, self.alpha, self.targets_from)
        self.alpha = None
        mix = [self.mix] if isinstance(self.mix, str) else list(self.mix)  # one store may come as a string
        self.mix = [f"{store}={float(share)!r}" for store, share in parse_mix(mix)]
        if self.temperature <= 0:
            raise ValueError(f"--temperature: must be positive, got {self.temperature}.")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep_checkpoints",
                     "chunk_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps: must be at least 1, got {self.max_steps}.")
        if self.epochs <= 0:
            raise ValueError(f"--epochs: must be positive, got {self.epochs}.")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ValueError(f"--min-lr-fraction: must be within [0, 1], got {self.min_lr_fraction}.")
        if self.eval_store is None and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction: must be within (0, 1), got {self.eval_fraction}; "
                             "or pass --eval-store.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers: must be at least 0, got {self.num_workers}.")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"--distributed: {self.distributed!r} is not one of {', '.join(DISTRIBUTED)}.")
        if self.fused_ce not in FUSED_CE:
            raise ValueError(f"--fused-ce: {self.fused_ce!r} is not one of {', '.join(FUSED_CE)}.")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"--loss-impl: {self.loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}.")
        self.keep_layers = _check_init(self.student, self.init_from_teacher, self.keep_layers)
        self._check_features()
        self._check_online()
        # The checks that need no store; the trainer's call adds those of the store's default targets.
        self.loss_config(self.targets_from or "topk_tail")

    def _check_features(self) -> None:
        if self.feature_loss is None:
            if self.feature_layers is not None or self.feature_projection != "auto":
                raise ValueError("--feature-layers and --feature-projection: they shape the feature loss, which is "
                                 "off; add --feature-loss mse or --feature-loss cosine.")
            return
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"--feature-loss: {self.feature_loss!r} is not one of {', '.join(FEATURE_LOSSES)}.")
        if not (math.isfinite(self.feature_weight) and self.feature_weight > 0):
            raise ValueError(f"--feature-weight: must be positive, got {self.feature_weight}; to train without it, "
                             "leave --feature-loss out.")
        if self.feature_projection not in PROJECTIONS:
            raise ValueError(f"--feature-projection: {self.feature_projection!r} is not one of "
                             f"{', '.join(PROJECTIONS)}.")
        if self.feature_layers is not None:
            self.feature_layers = [list(pair) for pair in parse_layer_map(self.feature_layers)]

    def _check_online(self) -> None:
        """`targets_from` is "online" exactly when there is an online teacher, which the loss must use."""
        if self.online_teacher is None:
            if self.targets_from == ONLINE:
                raise ValueError("--targets-from online: compares with a teacher run during training; name it with "
                                 "--online-teacher DIR.")
            return
        if self.targets_from not in (None, ONLINE):
            raise ValueError(f"--online-teacher and --targets-from {self.targets_from}: the divergences compare with "
                             "either the online teacher or the store's targets; give one of them.")
        self.targets_from = ONLINE
        if not any(not term.startswith(f"{CE}=") for term in self.loss):
            raise ValueError(f"--online-teacher: the loss is {' + '.join(self.loss)}, which does not use the teacher; "
                             "add a divergence (e.g. --alpha 0.9) or leave --online-teacher out.")
        if self.top_k is not None:
            raise ValueError(f"--top-k {self.top_k}: narrows the store's top-k targets, which --online-teacher does "
                             "not read; leave one of them out.")

    def loss_config(self, targets: str, sampled_tail_bucket: bool = False) -> LossConfig:
        """The loss of this run, its divergences over `targets` (the store's default unless `targets_from`)."""
        weights = {name: float(weight) for name, _, weight in (term.partition("=") for term in self.loss)}
        return LossConfig(weights=weights, targets=targets, temperature=self.temperature, jsd_beta=self.jsd_beta,
                          skew_alpha=self.skew_alpha, kd_schedule=self.kd_schedule,
                          chunk_positions=self.chunk_positions, sampled_tail_bucket=sampled_tail_bucket,
                          top_k=self.top_k, impl=self.loss_impl, rollout_clip=self.rollout_clip,
                          chunk_temperature=self.chunk_temperature)


def _resolve_loss(terms: list[str], alpha: float | None, targets_from: str | None) -> tuple[list[str], str | None]:
    """(the weighted terms "NAME=WEIGHT", zero weights dropped; the target representation) from --loss and --alpha."""
    weights: dict[str, float] = {}
    for term in terms:
        name, equals, value = term.partition("=")
        if not equals and name in TARGETS_FROM:  # `--loss topk_tail`, the form before the menu
            if targets_from not in (None, name):
                raise ValueError(f"--loss {name} and --targets-from {targets_from} name different targets; "
                                 "give one of them.")
            targets_from = name
            continue
        if name not in LOSS_NAMES:
            raise ValueError(f"--loss {term}: {name!r} is not a loss; the losses are {', '.join(LOSS_NAMES)}, "
                             "each as NAME=WEIGHT, e.g. --loss forward_kl=0.9 --loss ce=0.1 (see --help).")
        try:
            weight = float(value) if equals else math.nan
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"--loss {term}: expected NAME=WEIGHT with a number as weight, e.g. {name}=0.5.")
        if weight < 0:
            raise ValueError(f"--loss {term}: weights must be >= 0 (leave a term out to drop it).")
        if name in weights:
            raise ValueError(f"--loss: {name} is given twice ({name}={weights[name]!r} and {term}); give it once.")
        weights[name] = weight
    if weights and alpha is not None:
        raise ValueError(f"--alpha {alpha}: only sets the default mix forward_kl=ALPHA, ce=1-ALPHA; with NAME=WEIGHT "
                         "terms in --loss, weight ce there instead (e.g. --loss ce=0.1).")
    if not weights:
        alpha = DEFAULT_ALPHA if alpha is None else alpha
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha: must be within [0, 1], got {alpha}.")
        weights = {"forward_kl": alpha, CE: round(1.0 - alpha, 12)}
    if not any(weights.values()):
        raise ValueError(f"--loss: every weight is 0 ({', '.join(terms)}); give at least one term a positive weight.")
    if targets_from is not None and targets_from not in TARGETS_FROM:
        raise ValueError(f"--targets-from: {targets_from!r} is not one of {', '.join(TARGETS_FROM)}.")
    return [f"{name}={weight!r}" for name, weight in weights.items() if weight > 0], targets_from


def _check_init(student: str | None, teacher: str | None, keep_layers: list[int] | str | None) -> list[int] | None:
    """The layers to keep as a list, once the student's init is named exactly once."""
    if student and teacher:
        raise ValueError(f"--student {student} and --init-from-teacher {teacher} both give the student's init; give "
                         "one: a model or config as --student, or a teacher whose layers become the student.")
    if not student and not teacher:
        raise ValueError("no student: give --student (a model or config) or --init-from-teacher (a teacher whose "
                         "layers become the student).")
    if keep_layers is None:
        return None
    if not teacher:
        raise ValueError(f"--keep-layers {keep_layers}: selects layers of --init-from-teacher, which is not given.")
    items = keep_layers.split(",") if isinstance(keep_layers, str) else keep_layers
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ValueError(f"--keep-layers {keep_layers}: expected layer indices separated by commas, "
                         "e.g. 0,2,4 or 0,-1.") from None


def parse_mix(terms: list[str]) -> list[tuple[str, Fraction]]:
    """(store, share) of each "STORE=WEIGHT" term, the share exact as written (0.3 is 3/10).

    Raises:
        ValueError: a term that is not STORE=WEIGHT, a weight outside (0, 1), a store given twice, or weights that
            leave the main store no share.
    """
    mix = []
    for term in terms:
        store, equals, text = term.rpartition("=")
        try:
            share = Fraction(text.strip()) if equals and store else None
        except ValueError:
            share = None
        if share is None:
            raise ValueError(f"--mix {term}: expected STORE=WEIGHT with a number as weight, e.g. "
                             "--mix /cache/teacher-answers=0.5.")
        if not 0 < share < 1:
            raise ValueError(f"--mix {term}: the weight is the share of training batches drawn from {store}, in "
                             f"(0, 1); got {text}. Leave a store out rather than giving it 0.")
        if store in (given for given, _ in mix):
            raise ValueError(f"--mix: {store} is given twice; give it once, with the sum of its weights.")
        mix.append((store, share))
    total = sum((share for _, share in mix), Fraction(0))
    if total >= 1:
        raise ValueError(f"--mix: the weights sum to {float(total):g}, leaving --store no share of the batches (it "
                         "gets 1 - their sum, which must stay above 0); lower them, e.g. --mix STORE=0.5 trains "
                         "half the batches on STORE and half on --store.")
    return mix
