"""`train`: store -> loader -> student -> sparse-target loss -> AdamW, with evaluation and exact resume.

The teacher is never loaded: its targets stream from the store. Each optimizer step takes `grad_accum`
micro-batches; the loss is computed from the student's final hidden states a chunk of positions at a time (see
`student_train.losses`). Checkpoints hold everything needed to continue exactly, loader position included.

Legend: B batch, L positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from storage.reader import Store
from student_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from student_train.config import TrainConfig
from student_train.config_file import refuse_changed_config, save_run_config
from student_train.features import build_feature_head
from student_train.loader import LoaderConfig, StoreLoader, tail_bucket
from student_train.losses import LossConfig, distillation_loss
from student_train.student import build_student
from teacher_cache.teacher import resolve_device

log = logging.getLogger(__name__)


def default_targets(targets: dict) -> str:
    """The target representation of a store's divergences: topk_tail when it has top-k targets, else sampled."""
    return "topk_tail" if "topk" in targets else "sampled"


class Trainer:
    """One training run; `run()` trains to the end and returns the final evaluation."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output = Path(config.output)
        self._check_output()
        manifest = Store(config.store).manifest
        self.model, self.tokenizer = build_student(config, manifest)
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.head = self.model.get_output_embeddings()
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else (
            contextlib.nullcontext)
        self.loss_config = config.loss_config(config.targets_from or default_targets(manifest.targets),
                                              sampled_tail_bucket=tail_bucket(manifest.targets) is not None)
        # Evaluation always measures KL with the same estimator (forward KL over the store's default targets, at
        # T = 1), whatever the training loss, so runs compare.
        eval_targets = Store(config.eval_store).manifest.targets if config.eval_store else manifest.targets
        self.eval_loss_config = LossConfig(weights={"forward_kl": 1.0}, targets=default_targets(eval_targets),
                                           chunk_positions=config.chunk_positions,
                                           sampled_tail_bucket=tail_bucket(eval_targets) is not None)
        held_out = 0.0 if config.eval_store else config.eval_fraction
        self.train_loader = StoreLoader(LoaderConfig(
            store=config.store, batch_size=config.batch_size, seed=config.seed, num_workers=config.num_workers,
            selection=config.selection, exclude_fraction_from_end=held_out))
        self.eval_loader_config = LoaderConfig(
            store=config.eval_store or config.store, batch_size=config.batch_size, shuffle=False, drop_last=False,
            only_fraction_from_end=held_out)
        per_epoch = len(self.train_loader) // config.grad_accum
        if per_epoch < 1 and config.max_steps is None:
            raise ValueError(f"an epoch has {len(self.train_loader)} micro-batches, fewer than --grad-accum "
                             f"{config.grad_accum}; lower --grad-accum or --batch-size, or set --max-steps.")
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
        # The feature projections (None without --feature-loss): trained with the student, saved in checkpoints only.
        self.feature_head = None
        if config.feature_loss:
            self.feature_head = build_feature_head(
                manifest, self.model.config, kind=config.feature_loss, layer_map=config.feature_layers,
                project=config.feature_projection, seed=config.seed).to(self.device)
            log.info("feature loss: %s x %g over the (student, teacher) hidden states %s, %d projection parameters",
                     config.feature_loss, config.feature_weight, self.feature_head.layer_map,
                     sum(p.numel() for p in self.feature_head.parameters()))
        self.optimizer = _adamw(self.model, config, self.feature_head)
        warmup = config.warmup_steps if config.warmup_steps is not None else min(100, self.total_steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(warmup, self.total_steps, config.min_lr_fraction))
        self.step = 0

    def _check_output(self) -> None:
        has_checkpoints = latest_checkpoint(self.output) is not None
        if self.config.resume and not has_checkpoints:
            raise ValueError(f"--resume: {self.output} holds no checkpoint to resume from.")
        if self.config.resume:
            refuse_changed_config(self.config, self.output)
        if not self.config.resume and self.output.exists() and any(self.output.iterdir()):
            raise ValueError(f"--output {self.output} already exists and is not empty; pass --resume to continue "
                             "the run in it, or choose a new --output.")

    def run(self) -> dict:
        config = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        save_run_config(config, self.output)
        if config.resume:
            state = load_checkpoint(latest_checkpoint(self.output), model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, feature_head=self.feature_head)
            self.step = state["step"]
            self.train_loader.load_state_dict(state["loader"])
            _truncate_metrics(self.output / "metrics.jsonl", self.step)
        student = config.student or f"layers of {config.init_from_teacher}"
        log.info("training %s for %d steps on %s (loss %s over %s targets, T %.2f, KD schedule %s) on %s",
                 student, self.total_steps, config.store, " + ".join(config.loss), self.loss_config.targets,
                 config.temperature, config.kd_schedule, self.device)
        batches = self._batches()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="student-train", dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        evaluation = {}
        with bar, open(self.output / "metrics.jsonl", "a") as metrics:
            while self.step < self.total_steps:
                stats = self._train_step(batches)
                self.step += 1
                window_tokens += stats["tokens"]
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, **stats, "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window_tokens, window_start = 0, time.perf_counter()
                if self.step % config.eval_every == 0 or self.step == self.total_steps:
                    evaluation = {"step": self.step, **self.evaluate()}
                    metrics.write(json.dumps({"eval": evaluation}) + "\n")
                    metrics.flush()
                    log.info("step %d: eval %s", self.step, _fmt(evaluation))
                if self.step % config.save_every == 0 or self.step == self.total_steps:
                    save_checkpoint(self.output, self.step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, loader_state=self.train_loader.state_dict(),
                                    keep=config.keep_checkpoints, feature_head=self.feature_head)
        if not evaluation:  # resumed from a checkpoint at the last step: nothing trained, evaluate it anyway
            evaluation = {"step": self.step, **self.evaluate()}
        self._save_final(evaluation)
        return evaluation

    def _batches(self):
        """Micro-batches forever, epoch after epoch, from the loader's current position."""
        while True:
            yield from self.train_loader

    def _train_step(self, batches) -> dict:
        self.model.train()
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0}
        for _ in range(self.config.grad_accum):
            batch = _to_device(next(batches), self.device)
            with self.autocast():
                out = self._forward(batch, output_hidden_states=self.feature_head is not None)
            loss, parts = distillation_loss(out.last_hidden_state, self.head, batch, self.loss_config, step=self.step)
            if self.feature_head is not None:  # outside autocast: fp32
                feature = self.feature_head(out.hidden_states, batch)
                loss = loss + self.config.feature_weight * feature
                parts["feature"] = feature.detach()
            (loss / self.config.grad_accum).backward()
            totals["loss"] += loss.item() / self.config.grad_accum
            for name, value in parts.items():  # kd, ce, kd_scale, each divergence of the mix, feature
                if name != "tokens":
                    totals[name] = totals.get(name, 0.0) + float(value) / self.config.grad_accum
            totals["tokens"] += int(parts["tokens"])
        if self.config.clip_grad > 0:
            trained = [p for group in self.optimizer.param_groups for p in group["params"]]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trained, self.config.clip_grad))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _forward(self, batch: dict, output_hidden_states: bool = False):
        """The student's base model output; every layer's hidden states only when asked (the feature loss)."""
        return self.model.base_model(input_ids=batch["input_ids"][:, :-1],
                                     attention_mask=batch["attention_mask"][:, :-1].long(),
                                     output_hidden_states=output_hidden_states)

    def _hidden(self, batch: dict) -> torch.Tensor:
        return self._forward(batch).last_hidden_state

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out LM loss on true tokens, KL(teacher || student) on stored targets, top-1 agreement."""
        self.model.eval()
        tokens, ce, kl, agree = 0, 0.0, 0.0, 0.0
        for batch in StoreLoader(self.eval_loader_config):
            batch = _to_device(batch, self.device)
            with self.autocast():
                hidden_BLH = self._hidden(batch)
            _, parts = distillation_loss(hidden_BLH, self.head, batch, self.eval_loss_config)
            n = int(parts["tokens"])
            tokens += n
            ce += float(parts["ce"]) * n
            kl += float(parts["kd"]) * n
            agree += _top1_agreement(hidden_BLH, self.head, batch, self.config.chunk_positions)
        n = max(tokens, 1)
        return {"lm_loss": ce / n, "kl": kl / n, "top1_agreement": agree / n, "tokens": tokens}

    def _save_final(self, evaluation: dict) -> None:
        self.model.save_pretrained(self.output)
        self.tokenizer.save_pretrained(self.output)
        (self.output / "final_metrics.json").write_text(json.dumps(evaluation, indent=1))


def train(config: TrainConfig) -> dict:
    """Train a student as configured; returns the final held-out evaluation."""
    return Trainer(config).run()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a run wrote after its last checkpoint: the resumed run writes them again."""
    if not path.exists():
        return
    def record_step(line: str) -> int:
        record = json.loads(line)
        return record["eval"]["step"] if "eval" in record else record["step"]

    kept = [line for line in path.read_text().splitlines(keepends=True) if record_step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _top1_agreement(hidden_BLH, head, batch, chunk: int) -> float:
    """Positions where the student's argmax equals the teacher's most likely stored id."""
    mask_P = batch["loss_mask"].flatten()
    hidden_PH = hidden_BLH.flatten(0, 1)[mask_P]
    if "topk_ids" in batch:
        ids_PK, logp_PK = batch["topk_ids"].flatten(0, 1)[mask_P], batch["topk_logprobs"].flatten(0, 1)[mask_P]
    else:
        ids_PK, logp_PK = batch["sampled_ids"].flatten(0, 1)[mask_P], batch["sampled_counts"].flatten(0, 1)[mask_P]
    teacher_P = ids_PK.gather(1, logp_PK.argmax(1, keepdim=True)).squeeze(1)
    student_P = torch.cat([head(hidden_PH[i:i + chunk]).argmax(-1) for i in range(0, len(hidden_PH), chunk)])
    return float((student_P == teacher_P).sum())


def _adamw(model, config: TrainConfig, feature_head: torch.nn.Module | None = None) -> torch.optim.AdamW:
    parameters = [*model.parameters(), *(feature_head.parameters() if feature_head is not None else ())]
    decay = [p for p in parameters if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in parameters if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _warmup_cosine(warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
