"""`TrainConfig`: every option of `student-train`, checked where it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from student_train.divergences import ONLINE, TARGETS_FROM
from student_train.features import FEATURE_LOSSES, PROJECTIONS, parse_layer_map
from student_train.liger import FUSED_CE
from student_train.loss_config import CE, LOSS_IMPLS, LOSS_NAMES, LossConfig

PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("ddp", "fsdp")
DEFAULT_ALPHA = 0.9


@dataclass(kw_only=True)
class TrainConfig:
    """Options of one student training run.

    Attributes:
        store: store written by `teacher-cache build`.
        student: a local HF model directory (its weights are the init) or an HF config (a config.json file, or a
            directory holding only one) for a random init. Not with `init_from_teacher`.
        output: run directory: checkpoints, metrics and the final student.
        loss: the loss terms, "NAME=WEIGHT" each, NAME a divergence (forward_kl, reverse_kl, jsd, tv, skew_kl,
            skew_rkl) or ce; see student_train/losses.py. Empty: forward_kl=alpha, ce=1-alpha. A bare
            representation name ("topk_tail", ...) is the same as `targets_from`. Resolved on creation to the
            weighted terms alone, zero weights dropped.
        targets_from: target representation of the divergences: "topk_tail", "topk_renorm", "topk_residual",
            "sampled" or "hybrid" (the store's targets), or "online" (the full distribution of `online_teacher`,
            implied by it); None picks hybrid when the store's draws are of the teacher's tail (top-k + tail
            draws), else topk_tail when it has top-k targets, else sampled. See student_train/divergences.py.
        top_k: with topk_tail, topk_renorm or topk_residual, train on only the top_k most probable of the store's
            top-k ids (the others' mass joins the tail), e.g. top-8 from a top-64 store; None: every stored id.
            Not with hybrid, whose tail draws are conditioned on the stored top-k.
        online_teacher: a local HF teacher directory (the store's tokenizer and vocabulary) run beside the student:
            the divergences compare with its full distribution, a chunk of positions at a time, instead of the
            store's targets (which are not read; the store gives the token ids, and the held-out KL still uses its
            targets). The baseline for cached targets; see student_train/online_teacher.py.
        alpha: KD weight of the default mix when `loss` gives no weights (None: 0.9); resolved into `loss`.
        temperature: softening of teacher and student distributions (see student_train/divergences.py).
        jsd_beta: beta of the jsd divergence, in (0, 1).
        skew_alpha: alpha of the skew_kl and skew_rkl divergences, in (0, 1).
        kd_schedule: factor on the divergences' weights by step: constant, linear_warmup:STEPS or
            cosine_decay:STEPS.
        batch_size: samples per micro-batch, per rank under torchrun.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps; None is 10% of the run, at most 100.
        min_lr_fraction: the cosine schedule ends at this fraction of lr.
        max_steps: optimizer steps; None trains for `epochs`.
        epochs: passes over the training samples when max_steps is None.
        clip_grad: gradient-norm clipping threshold (0 disables).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32".
        device: "auto", "cpu", "cuda", ...
        eval_fraction: share of the store's samples (the last ones) held out for evaluation when eval_store is None.
        eval_store: a separate store for evaluation.
        eval_every: evaluate every this many steps (and at the end).
        save_every: checkpoint every this many steps (and at the end).
        log_every: write training metrics every this many steps.
        keep_checkpoints: most recent checkpoints kept.
        seed: seed of the data order and of a random student init.
        num_workers: DataLoader workers reading the store.
        verify: check every store file against its SHA-256 in the manifest before its first read (once per file
            per process); off, files are still checked for presence and size.
        distributed: under torchrun, "ddp" (each rank holds the whole student) or "fsdp" (FSDP2: parameters,
            gradients and optimizer states sharded over the ranks); unused in a single process.
        chunk_positions: positions whose student logits exist at once in the loss.
        fused_ce: how a loss of CE alone is computed: "auto" (Liger-kernel's fused linear cross-entropy on CUDA when
            liger_kernel is installed, else the torch path), "liger" (required: an error where it cannot run) or
            "torch". Both give the same loss and gradients; see student_train/liger.py.
        selection: a selection file (sample ids) to train on, in its order.
        resume: continue from the newest checkpoint in `output`.
        init_from_teacher: instead of `student`, a local HF teacher directory whose layers `keep_layers` (with its
            embeddings, final norm and head) are the student; see student_train/init_student.py.
        keep_layers: the teacher's layers to keep, "0,2,4" or a list; negative indices count from the end. None:
            every other layer from 0.
        feature_loss: "mse" or "cosine" between mapped student and stored teacher hidden states (the store must be
            built with --hidden-layers); None: no feature loss. See student_train/features.py.
        feature_weight: weight of the feature loss in the total (not scaled by the KD schedule).
        feature_layers: the layer map, "S:T,S:T" (student hidden-state index : teacher index as stored; 0 =
            embeddings, -1 = last) or a list of pairs; resolved to pairs. None: every stored teacher layer, each
            with the student layer at the same relative depth.
        feature_projection: "auto" (a learned linear projection per pair when the widths differ) or "always".
        loss_impl: how the loss's chunks are computed: "fused" (each chunk's logits once, their gradient built in
            the forward pass) or "checkpoint" (activation checkpointing: logits recomputed in backward; slower).
            Same loss and gradients; online KD always uses checkpoint. See student_train/fused_loss.py.
    """

    store: str
    student: str | None = None
    output: str
    loss: list[str] | str = field(default_factory=list)
    targets_from: str | None = None
    top_k: int | None = None
    online_teacher: str | None = None
    alpha: float | None = None
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    kd_schedule: str = "constant"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    min_lr_fraction: float = 0.1
    max_steps: int | None = None
    epochs: float = 1.0
    clip_grad: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    eval_fraction: float = 0.05
    eval_store: str | None = None
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    verify: bool = True
    distributed: str = "ddp"
    chunk_positions: int = 256
    fused_ce: str = "auto"
    selection: str | None = None
    resume: bool = False
    init_from_teacher: str | None = None
    keep_layers: list[int] | str | None = None
    feature_loss: str | None = None
    feature_weight: float = 1.0
    feature_layers: list[list[int]] | str | None = None
    feature_projection: str = "auto"
    loss_impl: str = "fused"

    def __post_init__(self) -> None:
        terms = [self.loss] if isinstance(self.loss, str) else list(self.loss)  # one term may come as a string
        self.loss, self.targets_from = _resolve_loss(terms, self.alpha, self.targets_from)
        self.alpha = None
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
                          top_k=self.top_k, impl=self.loss_impl)


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
