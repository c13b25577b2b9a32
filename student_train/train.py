"""`train`: store -> loader -> student -> sparse-target loss -> AdamW, with evaluation and exact resume.

The teacher is not loaded: its targets stream from the store. The exception is the online KD baseline
(`--online-teacher`), where the teacher runs beside the student on the store's token ids and the loss compares with
its full distribution (see `student_train.online_teacher`); evaluation still uses the store's targets. Each
optimizer step takes `grad_accum` micro-batches; the loss is computed from the student's final hidden states a chunk
of positions at a time (see `student_train.losses`). Checkpoints hold everything needed to continue exactly, loader
position included.

Under torchrun each rank trains on its own part of every global batch (see `student_train.distributed`): the global
batch is batch_size x grad_accum x world_size samples, and the ranks' gradients average to the single-process
gradient of that batch. Only rank 0 logs, writes metrics, checkpoints and the final student.

With `--mix`, the training loader is a `MixedLoader` (`student_train.mixture_loader`): each micro-batch is whole from
one of the stores, at fixed shares, and the metrics count where each logging window's samples came from.

Legend: B batch, L positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm

from storage.causal_lm import forward_inputs, resolve_device
from storage.lock import is_lock_file
from storage.manifest import Manifest, isolates_documents
from storage.reader import Store
from storage.targets.rollout import ROLLOUT as ROLLOUT_KIND
from student_train.checkpoint import latest_checkpoint, load_checkpoint, read_state, remove_staging, save_checkpoint
from student_train.collate import tail_bucket
from student_train.config import TrainConfig
from student_train.config_file import refuse_changed_config, save_run_config
from student_train.cross_tokenizer import cross_tokenizer_for, default_cross_targets
from student_train.distributed import TrainedModules, World, launch
from student_train.features import build_feature_head
from student_train.liger import use_liger
from student_train.loader import LoaderConfig, StoreLoader
from student_train.loss_config import ROLLOUT, LossConfig
from student_train.losses import TEACHER_HIDDEN, distillation_loss
from student_train.mixture_loader import MAIN, MixSource, SourceWindow, mixed_loader, open_mixed_stores
from student_train.online_teacher import OnlineTeacher
from student_train.order import held_out_range
from student_train.run_dir import check_writable, output_lock, truncate_metrics
from student_train.student import build_student, student_tokenizer
from student_train.targets import check_targets, check_top_k, default_targets, eval_targets

log = logging.getLogger(__name__)


class Trainer:
    """One training run; `run()` trains to the end and returns the final evaluation.

    Args:
        config: the run's options.
        world: this process's rank among the run's (see `student_train.distributed.launch`); None: a single
            process on `config.device`.
    """

    def __init__(self, config: TrainConfig, world: World | None = None):
        self.config = config
        self.world = world or World(device=resolve_device(config.device))
        self.output = Path(config.output)
        self._check_output()
        manifest = Store(config.store).manifest
        self.device = self.world.device
        # The student reads packed documents as the teacher did: alone, or attending across each other.
        self.isolated = isolates_documents(manifest.build)
        # A student with another tokenizer reads the store through the character alignment (`CrossTokenizer`).
        tokenizer = student_tokenizer(config, manifest)
        self.cross = cross_tokenizer_for(config, manifest, tokenizer)
        default = (default_cross_targets if self.cross else default_targets)(manifest.targets)
        loss_config = config.loss_config(config.targets_from or default,
                                         sampled_tail_bucket=tail_bucket(manifest.targets) is not None)
        # Decided before the student loads, so that --fused-ce liger where it cannot run fails at once.
        self.loss_config = dataclasses.replace(loss_config,
                                               fused_ce=use_liger(config.fused_ce, self.device, loss_config))
        if self.loss_config.divergence_weights:
            check_targets(self.loss_config.targets, manifest.targets)
        check_top_k(config.top_k, manifest.targets)
        mixed = open_mixed_stores(config, manifest, self.loss_config) if config.mix else {}
        _check_rollout(self.loss_config, {config.store: manifest} | mixed)
        held_out = 0.0 if config.eval_store else config.eval_fraction
        train_split = LoaderConfig(
            store=config.store, batch_size=config.batch_size, seed=config.seed, num_workers=config.num_workers,
            selection=config.selection, exclude_fraction_from_end=held_out, verify=config.verify)
        _check_split(manifest.num_samples, config, train_split, self.world.world_size)
        self.model, self.tokenizer = build_student(config, manifest, tokenizer, cross=self.cross is not None)
        self.model.to(self.device)
        self.head = self.model.get_output_embeddings()
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else (
            contextlib.nullcontext)
        # Online KD: the teacher in the precision of the student's autocast, never trained nor saved.
        self.teacher = None
        if config.online_teacher:
            self.teacher = OnlineTeacher(config.online_teacher, manifest, device=self.device, bf16=bf16)
            self.teacher.check_loss(self.loss_config, self.head.weight.shape[0])
        self.teacher_head = self.teacher.logits if self.teacher else None
        # Evaluation always measures KL with the same estimator (forward KL over `eval_targets`, at T = 1), whatever
        # the training loss, so runs compare.
        held_out_targets = Store(config.eval_store).manifest.targets if config.eval_store else manifest.targets
        self.eval_loss_config = LossConfig(weights={"forward_kl": 1.0}, targets=eval_targets(held_out_targets,
                                                                                         cross=self.cross is not None),
                                           chunk_positions=config.chunk_positions,
                                           sampled_tail_bucket=tail_bucket(held_out_targets) is not None,
                                           impl=config.loss_impl, chunk_temperature=config.chunk_temperature)
        self.train_loader = StoreLoader(train_split, rank=self.world.rank, world_size=self.world.world_size,
                                        transform=self.cross)
        # Without --mix, every batch is of --store; with it, each batch names its store (`MixedLoader.source_of`).
        self.main_source = MixSource(index=0, name=MAIN, store=config.store, share=Fraction(1),
                                     isolated=self.isolated)
        self.source_window = None
        if config.mix:
            self.train_loader = mixed_loader(config, self.train_loader, manifest, mixed, rank=self.world.rank,
                                             world_size=self.world.world_size)
            self.source_window = SourceWindow([source.name for source in self.train_loader.sources])
        self.eval_loader_config = LoaderConfig(
            store=config.eval_store or config.store, batch_size=config.batch_size, shuffle=False, drop_last=False,
            only_fraction_from_end=held_out, verify=config.verify)
        per_epoch = len(self.train_loader) // config.grad_accum
        if per_epoch < 1 and config.max_steps is None:
            ranks = f" on each of {self.world.world_size} ranks" if self.world.world_size > 1 else ""
            raise ValueError(f"an epoch has {len(self.train_loader)} micro-batches{ranks}, fewer than --grad-accum "
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
        # What DDP or FSDP wraps (all of it, so the gradients of the head and the projections are reduced too); the
        # optimizer comes after, as FSDP replaces the parameters with their shards.
        self.replica = self.world.wrap(TrainedModules(self.model, self.feature_head))
        self.optimizer = _adamw(self.model, config, self.feature_head)
        warmup = config.warmup_steps if config.warmup_steps is not None else min(100, self.total_steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(warmup, self.total_steps, config.min_lr_fraction))
        self.step = 0

    def _check_output(self) -> None:
        check_writable(self.output)
        has_checkpoints = latest_checkpoint(self.output) is not None
        if self.config.resume and not has_checkpoints:
            raise ValueError(f"--resume: {self.output} holds no checkpoint to resume from.")
        if self.config.resume:
            refuse_changed_config(self.config, self.output)
        if not self.config.resume and self.output.exists() and any(not is_lock_file(path.name)
                                                                    for path in self.output.iterdir()):
            raise ValueError(f"--output {self.output} already exists and is not empty; pass --resume to continue "
                             "the run in it, or choose a new --output.")
        if self.config.resume:
            self._check_world_size(latest_checkpoint(self.output))

    def _check_world_size(self, checkpoint: Path) -> None:
        """Refuse to resume on another number of processes: the global batch, and each rank's samples, would change."""
        saved = read_state(checkpoint)["loader"]["world_size"]
        if saved != self.world.world_size:
            raise ValueError(f"--resume: {checkpoint} was written by a run on {saved} process(es) and this run has "
                             f"{self.world.world_size}; resume on {saved} (e.g. torchrun --nproc-per-node {saved}), "
                             "or start a new --output.")

    def run(self) -> dict:
        config = self.config
        main = self.world.is_main
        self.world.barrier()  # every rank has checked --output before rank 0 writes to it
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_run_config(config, self.output)
            if config.resume:
                remove_staging(self.output)
        if config.resume:
            with self.world.loading():
                state = load_checkpoint(latest_checkpoint(self.output), model=self.model, optimizer=self.optimizer,
                                        scheduler=self.scheduler, feature_head=self.feature_head)
            self.world.shard_optimizer_state(self.optimizer)
            self.step = state["step"]
            self.train_loader.load_state_dict(state["loader"])
            if main:
                truncate_metrics(self.output / "metrics.jsonl", self.step)
        student = config.student or f"layers of {config.init_from_teacher}"
        stores = config.store if self.source_window is None else (
            f"{config.store} mixed with {', '.join(source.store for source in self.train_loader.sources[1:])} "
            f"(shares of micro-batches {self.train_loader.describe()})")
        log.info("training %s for %d steps on %s (loss %s over %s targets, T %.2f, KD schedule %s) on %s",
                 student, self.total_steps, stores, " + ".join(config.loss), self.loss_config.targets,
                 config.temperature, config.kd_schedule, self.device)
        batches = self._batches()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="student-train", dynamic_ncols=True,
                   disable=not main)
        window_tokens, window_start = 0, time.perf_counter()
        evaluation = {}
        # The other ranks hold the same global metrics and write them nowhere.
        metrics_path = self.output / "metrics.jsonl" if main else Path(os.devnull)
        with bar, open(metrics_path, "a") as metrics:
            while self.step < self.total_steps:
                stats = self._train_step(batches)
                self.step += 1
                window_tokens += stats["tokens"]
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, **stats, "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    if self.source_window is not None:  # where the window's samples came from
                        record |= self.source_window.record()
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
                    whole = self.world.whole(self.replica, self.optimizer)  # every rank: FSDP gathers the shards
                    if main:
                        save_checkpoint(self.output, self.step, model=whole.model, optimizer=whole.optimizer,
                                        scheduler=self.scheduler, loader_state=self.train_loader.state_dict(),
                                        keep=config.keep_checkpoints, feature_head=whole.feature_head)
                    self.world.barrier()  # a rank that fails from here on leaves a complete checkpoint behind
        if not evaluation:  # resumed from a checkpoint at the last step: nothing trained, evaluate it anyway
            evaluation = {"step": self.step, **self.evaluate()}
        self._save_final(evaluation)
        self.world.barrier()  # the final student is written when train() returns, on every rank
        return evaluation

    def _batches(self):
        """Micro-batches forever, epoch after epoch, from the loader's current position."""
        while True:
            yield from self.train_loader

    def _train_step(self, batches) -> dict:
        self.model.train()
        accum, ranks = self.config.grad_accum, self.world.world_size
        micro = [next(batches) for _ in range(accum)]
        # The store of each micro-batch: with --mix, the one the batch names; else --store.
        sources = ([self.main_source] * accum if self.source_window is None else
                   [self.train_loader.source_of(batch) for batch in micro])
        # Each loss term is a mean over a micro-batch's loss-mask tokens. Over the ranks, the global micro-batch's
        # mean is sum_r share_r * mean_r, share_r = n_r / N (N = sum_r n_r tokens); DDP and FSDP average the ranks'
        # gradients, so rank r backpropagates ranks * share_r * mean_r. In a single process that factor is 1.
        tokens_A = torch.tensor([int(batch["loss_mask"].sum()) for batch in micro])
        total_A = self.world.sum(tokens_A)
        share_A = torch.where(total_A > 0, tokens_A / total_A.clamp(min=1), 1 / ranks).tolist()
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        # With --mix: per store, the samples, trained tokens and loss x tokens of this step (SourceWindow).
        by_source_S3 = None if self.source_window is None else torch.zeros(len(self.train_loader.sources), 3,
                                                                           dtype=torch.float64)
        for index, (source, batch) in enumerate(zip(sources, micro, strict=True)):
            batch, share = _to_device(batch, self.device), share_A[index]
            if self.teacher is not None:
                batch[TEACHER_HIDDEN] = self.teacher.hidden(batch)
            with self.world.gradient_sync(self.replica, sync=index == accum - 1):
                with self.autocast():
                    out = self._forward(batch, output_hidden_states=self.feature_head is not None,
                                        isolated=source.isolated)
                loss, parts = distillation_loss(out.last_hidden_state, self.head, batch, self.loss_config,
                                                step=self.step, teacher_head=self.teacher_head,
                                                rollouts_optional=self.source_window is not None)
                if self.feature_head is not None:  # outside autocast: fp32
                    feature = self.feature_head(out.hidden_states, batch)
                    loss = loss + self.config.feature_weight * feature
                    parts["feature"] = feature.detach()
                (loss * (ranks * share) / accum).backward()
            totals["loss"] += loss.item() * share / accum
            if by_source_S3 is not None:
                tokens = int(tokens_A[index])
                by_source_S3[source.index] += torch.tensor([len(batch["sample_ids"]), tokens, loss.item() * tokens],
                                                           dtype=torch.float64)
            for name, value in parts.items():  # kd, ce, kd_scale, each divergence of the mix, feature
                if name != "tokens":
                    totals[name] = totals.get(name, 0.0) + float(value) * share / accum
        totals = dict(zip(totals, self.world.sum(list(totals.values())).tolist(), strict=True))
        totals["tokens"] = int(total_A.sum())
        if by_source_S3 is not None:
            self.source_window.add(self.world.sum(by_source_S3))
        if self.config.clip_grad > 0:
            trained = [p for group in self.optimizer.param_groups for p in group["params"]]
            totals["grad_norm"] = self.world.clip_grad_norm(trained, self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _forward(self, batch: dict, output_hidden_states: bool = False, module: torch.nn.Module | None = None,
                 isolated: bool | None = None):
        """The student's base model output (through DDP or FSDP unless another `module` is given); every layer's
        hidden states only when asked (the feature loss). `isolated`: whether the batch's documents attend only
        within themselves, as its store was built (default: as --store's)."""
        segments = batch["segment_ids"][:, :-1] if (self.isolated if isolated is None else isolated) else None
        return (module or self.replica)(**forward_inputs(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                                         segments), output_hidden_states=output_hidden_states)

    def _hidden(self, batch: dict) -> torch.Tensor:
        """Final hidden states for evaluation, outside DDP's gradient synchronisation."""
        return self._forward(batch, module=self.world.unwrapped(self.replica)).last_hidden_state

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out LM loss on true tokens, KL(teacher || student) on stored targets, top-1 agreement; across
        tokenizers also the LM loss in bits per character (the KL and agreement then over mapped targets, at the
        aligned positions).

        The ranks share the held-out batches (rank r takes batches r, r + world_size, ...) and sum their results.
        """
        self.model.eval()
        tokens, ce, kl, kl_tokens, agree, compared, chars = 0, 0.0, 0.0, 0, 0.0, 0, 0
        loader = StoreLoader(self.eval_loader_config, rank=self.world.rank, world_size=self.world.world_size,
                             interleave=True, transform=self.cross)
        for batch in loader:
            batch = _to_device(batch, self.device)
            with self.autocast():
                hidden_BLH = self._hidden(batch)
            _, parts = distillation_loss(hidden_BLH, self.head, batch, self.eval_loss_config)
            n = int(parts["tokens"])
            tokens += n
            ce += float(parts["ce"]) * n
            if "kd_mask" in batch:  # across tokenizers: the KL where the teacher's distribution maps, alone
                _, parts = distillation_loss(hidden_BLH, self.head, batch | {"loss_mask": batch["loss_mask"]
                                                                            & batch["kd_mask"]}, self.eval_loss_config)
            kl += float(parts["kd"]) * int(parts["tokens"])
            kl_tokens += int(parts["tokens"])
            agreed, count = _top1_agreement(hidden_BLH, self.head, batch, self.config.chunk_positions)
            agree, compared = agree + agreed, compared + count
            chars += int(batch["chars"][batch["loss_mask"]].sum()) if "chars" in batch else 0
        if self.world.sharded:  # FSDP gathers shards in every forward: a rank with a batch fewer joins once more
            for _ in range(len(loader), -(-loader.order.num_batches // self.world.world_size)):
                self.replica(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device))
        tokens, ce, kl, kl_tokens, agree, compared, chars = self.world.sum(
            [tokens, ce, kl, kl_tokens, agree, compared, chars]).tolist()
        tokens = int(tokens)
        n = max(tokens, 1)
        result = {"lm_loss": ce / n, "kl": kl / max(kl_tokens, 1), "top1_agreement": agree / max(compared, 1),
                  "tokens": tokens}
        if self.cross is not None:
            result["bits_per_char"] = ce / max(chars, 1) / math.log(2)
        return result

    def _save_final(self, evaluation: dict) -> None:
        whole = self.world.whole(self.replica, self.optimizer)
        if not self.world.is_main:
            return
        whole.model.save_pretrained(self.output)
        self.tokenizer.save_pretrained(self.output)
        (self.output / "final_metrics.json").write_text(json.dumps(evaluation, indent=1))


def train(config: TrainConfig) -> dict:
    """Train a student as configured, on the processes torchrun started if it did; returns the final held-out
    evaluation (on every rank).

    Raises:
        LockError: another run writes to `config.output` (`storage/lock.py`).
    """
    with launch(config.distributed, config.device) as world, output_lock(Path(config.output), world):
        return Trainer(config, world).run()


def _check_split(num_samples: int, config: TrainConfig, loader: LoaderConfig, world_size: int) -> None:
    """Without --eval-store, the store's last samples are held out (--eval-fraction; `loader` is the training
    loader's config, whose split `held_out_range` computes): they must hold at least one sample, and the samples
    before them a batch for each rank (but with --selection, which the loader checks).

    Raises:
        ValueError: naming the split and the ways to fix it.
    """
    if config.eval_store:
        return
    left = held_out_range(num_samples, loader)[1]
    held_out = num_samples - left
    if held_out >= 1 and (left >= config.batch_size * world_size or config.selection):
        return
    ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
    problem = (" and nothing to evaluate on" if held_out < 1 else
               f", fewer than one batch of --batch-size {config.batch_size}{ranks}")
    raise ValueError(f"--eval-fraction {config.eval_fraction}: the store has {num_samples} samples; it holds out the "
                     f"last {held_out} for evaluation, leaving {left} for training{problem}. Evaluate on another "
                     "store (--eval-fraction 0 --eval-store STORE), choose an --eval-fraction that holds out at least "
                     "one sample and leaves a batch, a smaller --batch-size, or build a bigger store.")


def _check_rollout(loss_config: LossConfig, manifests: dict[str, Manifest]) -> None:
    """rollout_rkl reads the generator's log-probs, which only a store built over rollouts holds: at least one of
    the run's stores (`manifests` by store: --store, then those of --mix, whose batches without them add 0).

    Raises:
        ValueError: rollout_rkl has weight and no store's manifest has `targets["rollout"]`.
    """
    if ROLLOUT not in loss_config.kd_weights or any(ROLLOUT_KIND.present(m.targets) for m in manifests.values()):
        return
    store, manifest = next(iter(manifests.items()))
    if len(manifests) == 1:
        found = (f"the store {store} holds no rollouts (its manifest's targets are {', '.join(manifest.targets)}, "
                 f"without {ROLLOUT_KIND.section!r})")
    else:
        found = (f"none of the stores {', '.join(manifests)} holds rollouts (a manifest's targets with "
                 f"{ROLLOUT_KIND.section!r})")
    raise ValueError(
        f"--loss {ROLLOUT}: {found}, so there are no log-probs the student sampled its tokens with. Build the store "
        f"with `teacher-cache build --dataset ROLLOUTS` over a `teacher-cache generate --model STUDENT` output of "
        f"this student (with the store's tokenizer), or drop {ROLLOUT}."
    )


def _top1_agreement(hidden_BLH, head, batch, chunk: int) -> tuple[float, int]:
    """(positions where the student's argmax equals the teacher's most likely stored id, positions compared): the
    trained ones, those with mapped targets across tokenizers (`kd_mask`), none without top-k or sampled targets."""
    mask_P = (batch["loss_mask"] & batch.get("kd_mask", True)).flatten()
    if "topk_ids" not in batch and "sampled_ids" not in batch:
        return 0.0, 0
    hidden_PH = hidden_BLH.flatten(0, 1)[mask_P]
    if "topk_ids" in batch:
        ids_PK, logp_PK = batch["topk_ids"].flatten(0, 1)[mask_P], batch["topk_logprobs"].flatten(0, 1)[mask_P]
    else:
        ids_PK, logp_PK = batch["sampled_ids"].flatten(0, 1)[mask_P], batch["sampled_counts"].flatten(0, 1)[mask_P]
    teacher_P = ids_PK.gather(1, logp_PK.argmax(1, keepdim=True)).squeeze(1)
    student_P = torch.cat([head(hidden_PH[i:i + chunk]).argmax(-1) for i in range(0, len(hidden_PH), chunk)])
    return float((student_P == teacher_P).sum()), len(teacher_P)


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
