"""`TrainConfig`: every option of `student-train`, checked where it is made."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(kw_only=True)
class TrainConfig:
    """Options of one student training run.

    Attributes:
        store: store written by `teacher-cache build`.
        student: a local HF model directory (its weights are the init) or an HF config (a config.json file, or a
            directory holding only one) for a random init.
        output: run directory: checkpoints, metrics and the final student.
        loss: "topk_tail", "topk_renorm" or "sampled"; None picks topk_tail when the store has top-k targets,
            else sampled.
        alpha: weight of the distillation loss; 1 - alpha weights cross-entropy on the true tokens (0 = CE only).
        temperature: softening of teacher and student distributions (see student_train/losses.py).
        batch_size: samples per micro-batch.
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
        chunk_positions: positions whose student logits exist at once in the loss.
        selection: a selection file (sample ids) to train on, in its order.
        resume: continue from the newest checkpoint in `output`.
    """

    store: str
    student: str
    output: str
    loss: str | None = None
    alpha: float = 0.9
    temperature: float = 1.0
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
    chunk_positions: int = 256
    selection: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha: must be within [0, 1], got {self.alpha}.")
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

    def save(self, path: Path) -> None:
        """Write the resolved config as JSON."""
        path.write_text(json.dumps(asdict(self), indent=1))
