"""Distillation losses: a weighted mix of divergences on the store's sparse targets, plus CE; never a dense teacher
(but for online KD, the baseline: a teacher run beside the student, one chunk of its logits at a time).

Sits between the loader (which collates a batch of store records) and the trainer. The student gives its final
hidden states and its output head; the head is applied here, over the trained positions only, in chunks of
positions, so at most one chunk's [C, V] logits (and, in backward, their gradient) exist at once. By default
(`LossConfig.impl` "fused") each chunk's logits are computed once and their gradient is built in the forward pass
(`student_train.fused_loss`); with "checkpoint", and always with online targets, each chunk runs under
non-reentrant activation checkpointing: the forward keeps only the chunk's inputs and backward recomputes its
logits. Both give the same loss and gradients. Everything after the head is in fp32, whatever the autocast dtype.

The loss of a batch, each term a mean over `loss_mask` positions:

    loss = s(step) * T^2 * sum_d w_d * D_d(p, q)  +  w_ce * CE

- D_d: the divergences of `student_train.divergences` (forward_kl, reverse_kl, jsd, tv, skew_kl, skew_rkl), each
  between the teacher p and the student q as given by one target representation (topk_tail, topk_renorm,
  sampled, hybrid or topk_residual from the store, or online; see that module for what each computes, its tail
  and its temperature; topk_residual also reads the true next token, which the loss adds to its targets). All
  divergences of a mix share the representation and the temperature T; T^2 keeps the gradient's scale roughly
  independent of T. `LossConfig.top_k` keeps only the k most probable of the stored top-k ids (the others' mass
  joins the tail), so one store of top-64 also trains, say, the top-8 variants (not with hybrid, whose tail draws
  are conditioned on the stored top-k).
- Online: the batch holds the teacher's final hidden states (`TEACHER_HIDDEN`, added by the trainer) instead of
  targets, and `teacher_head` turns one chunk of them into the teacher's [C, V] logits inside the chunk, without
  gradient; like the student's, they are recomputed in backward rather than kept.
- CE: -log softmax(z)[true next token], never tempered, never scheduled.
- w: the weights of `LossConfig.weights`, used as given (they need not sum to 1). A term of weight 0 is not
  computed; with no divergence the batch needs no targets and the reported KD is 0.
- s(step): the KD schedule (`kd_scale`), a factor in [0, 1] on every divergence, from the optimizer step.

A loss of CE alone may instead come from Liger-kernel's fused linear cross-entropy on CUDA (`LossConfig.fused_ce`;
see `student_train.liger`), which gives the same CE and gradients without the checkpointed chunks.

Legend: B batch, L positions per row, H hidden size (G the online teacher's), V vocabulary, P trained positions
(loss_mask true), C positions in a chunk, D divergences in the mix, K stored top-k ids (k kept of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from student_train.divergences import (
    DIVERGENCES,
    ONLINE,
    READS_TRUE_IDS,
    REPRESENTATIONS,
    TAIL_BUCKET,
    TARGET_KEYS,
    TARGETS_FROM,
    TRUE_IDS,
    Logits,
)
from student_train.fused_loss import fused_loss, weighted_loss
from student_train.liger import liger_ce_sum

__all__ = ["CE", "DIVERGENCES", "LOSS_IMPLS", "LOSS_NAMES", "ONLINE", "REPRESENTATIONS", "SCHEDULES", "TAIL_BUCKET",
           "TARGETS_FROM", "TEACHER_HIDDEN", "LossConfig", "distillation_loss", "kd_scale"]

CE = "ce"
LOSS_NAMES = (*DIVERGENCES, CE)  # the terms a loss mixes
# KD schedules: STEPS is a number of optimizer steps.
SCHEDULES = ("constant", "linear_warmup:STEPS", "cosine_decay:STEPS")
# The batch record of the online teacher's final hidden states [B, L, G]; see TARGET_KEYS.
TEACHER_HIDDEN = TARGET_KEYS[ONLINE][0]
# Representations that read the stored top-k, which `LossConfig.top_k` may narrow.
TOPK_REPRESENTATIONS = ("topk_tail", "topk_renorm", "topk_residual")
# Representations of draws the store made at T = 1, of the whole distribution or of its tail: why no other T works.
DRAWN = {
    "sampled": "the stored draws come from the teacher at temperature 1, so counts / N estimates the untempered "
               "distribution",
    "hybrid": "the stored tail draws come from the teacher at temperature 1, so tail mass * counts / N estimates its "
              "untempered tail",
}
# Representations whose target is 0 on ids where the student is not: why reverse KL is infinite there.
ZERO_OFF_SUPPORT = {
    "sampled": "the draws' empirical distribution is 0 on every id not drawn, where the student is not, so "
               "KL(q || counts / N) is infinite",
    "hybrid": "the tail estimate tail mass * counts / N is 0 on every tail id not drawn, where the student is not, so "
              "KL(q || p-hat) is infinite",
    "topk_residual": "the target is 0 on every id outside the top-k and the true token, where the student is not, so "
                     "KL(q || p~) is infinite",
}
# The online teacher's output head with its logit post-processing: hidden states [C, G] -> logits [C, V].
TeacherHead = Callable[[torch.Tensor], torch.Tensor]
# How the chunks of the loss are computed: see `LossConfig.impl`.
LOSS_IMPLS = ("fused", "checkpoint")


def kd_scale(schedule: str, step: int) -> float:
    """The factor on the KD terms at optimizer step `step` (0 for the first step).

    - constant: 1.
    - linear_warmup:N: (step + 1) / N up to 1, reached at step N - 1 (CE leads the first steps when it has weight).
    - cosine_decay:N: (1 + cos(pi * step / N)) / 2, from 1 at step 0 to 0 at step N and after (KD early, CE late).

    Raises:
        ValueError: `schedule` is none of those.
    """
    name, _, steps = schedule.partition(":")
    if name == "constant" and not steps:
        return 1.0
    if name in ("linear_warmup", "cosine_decay") and steps.isdigit() and int(steps) > 0:
        n = int(steps)
        if name == "linear_warmup":
            return min(1.0, (step + 1) / n)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / n)))
    raise ValueError(f"kd_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)} (STEPS a positive integer), "
                     "e.g. linear_warmup:500.")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the student learns from the targets.

    Attributes:
        weights: weight of each term, by name: a key of DIVERGENCES or "ce". Weights are >= 0, not all 0.
        targets: the target representation of every divergence, a key of TARGETS_FROM: the store's (REPRESENTATIONS)
            or ONLINE, the full distribution of a teacher run beside the student (`distillation_loss`'s
            `teacher_head`).
        temperature: softmax temperature of the divergences (their sum is scaled by T^2); must be 1 with sampled and
            hybrid.
        jsd_beta: jsd's beta, in (0, 1): the teacher's share of the mixture m = beta p + (1 - beta) q.
        skew_alpha: skew_kl's and skew_rkl's alpha, in (0, 1): the share of the first distribution in the mixture.
        kd_schedule: factor on the divergences by optimizer step, one of SCHEDULES (see `kd_scale`).
        chunk_positions: positions whose student logits exist at once.
        sampled_tail_bucket: the store's sampled draws include a tail bucket (id TAIL_BUCKET once collated), whose
            student probability is the mass outside the position's top-k ids; the batch must hold `topk_ids`.
        fused_ce: CE comes from Liger-kernel's fused linear cross-entropy (CUDA, liger_kernel installed; see
            `student_train.liger.use_liger`) instead of the chunks; only for a loss of CE alone. Same numbers.
        top_k: with topk_tail, topk_renorm or topk_residual, use only the `top_k` most probable of the stored ids;
            the others' mass joins the tail (topk_tail, topk_residual) or is dropped with it (topk_renorm). Refused
            with hybrid. None: every stored id.
        impl: how the chunks are computed, one of LOSS_IMPLS. "fused": each chunk's logits once, their gradient
            built in forward and kept as the hidden states' and head's gradients until backward (see
            `student_train.fused_loss`); "checkpoint": each chunk under activation checkpointing, its logits
            recomputed in backward (slower; the reference). Same loss and gradients. Online targets always use
            "checkpoint"; `fused_ce` takes precedence for CE alone.
    """

    weights: dict[str, float] = field(default_factory=lambda: {"forward_kl": 1.0})
    targets: str = "topk_tail"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    kd_schedule: str = "constant"
    chunk_positions: int = 1024
    sampled_tail_bucket: bool = False
    fused_ce: bool = False
    top_k: int | None = None
    impl: str = "fused"

    def __post_init__(self) -> None:
        unknown = [name for name in self.weights if name not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"loss {unknown[0]!r} is not one of {', '.join(LOSS_NAMES)}.")
        bad = {name: weight for name, weight in self.weights.items() if not (math.isfinite(weight) and weight >= 0)}
        if bad:
            raise ValueError(f"loss weights: expected finite weights >= 0, got {bad}.")
        if not any(self.weights.values()):
            raise ValueError(f"loss weights: all are 0 ({self.weights}); give at least one term a positive weight.")
        if self.targets not in TARGETS_FROM:
            raise ValueError(f"targets: {self.targets!r} is not one of {', '.join(TARGETS_FROM)}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a positive temperature, got {self.temperature}.")
        for name in ("jsd_beta", "skew_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1), got {getattr(self, name)}.")
        kd_scale(self.kd_schedule, 0)
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions: expected a positive number of positions, got {self.chunk_positions}.")
        if self.kd_weights:
            self._check_representation()
        if self.fused_ce and self.kd_weights:
            raise ValueError(f"fused_ce: Liger's fused kernel computes CE alone, and the loss also has "
                             f"{', '.join(self.kd_weights)}; use the torch path for a mix.")
        if self.top_k is not None and self.targets == "hybrid":
            raise ValueError(f"top_k: {self.top_k} cannot narrow hybrid targets: their tail draws are of the ids "
                             "outside the stored top-k, so ids dropped from the head would be neither exact nor "
                             "drawn. Leave top_k out, or use topk_tail or topk_residual with top_k.")
        if self.top_k is not None and (self.top_k < 1 or self.targets not in TOPK_REPRESENTATIONS):
            raise ValueError(f"top_k: {self.top_k} keeps the most probable of the stored top-k ids, which needs a "
                             f"positive number and top-k targets ({' or '.join(TOPK_REPRESENTATIONS)}), and the "
                             f"targets are {self.targets}.")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"impl: {self.impl!r} is not one of {', '.join(LOSS_IMPLS)}.")

    def _check_representation(self) -> None:
        """The temperature and divergences the targets support."""
        if self.targets in DRAWN and self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} cannot be used with {self.targets} targets: {DRAWN[self.targets]}, "
                "and a tempered one (proportional to p^(1/T)) cannot be recovered from draws. Use temperature 1.0, "
                "or top-k targets."
            )
        if self.targets in ZERO_OFF_SUPPORT and "reverse_kl" in self.kd_weights:
            other = "top-k targets" if self.targets == "sampled" else "topk_tail targets"
            raise ValueError(
                f"reverse_kl cannot be used with {self.targets} targets: {ZERO_OFF_SUPPORT[self.targets]}. Use "
                f"skew_rkl (finite), jsd or tv, or {other}."
            )

    @property
    def kd_weights(self) -> dict[str, float]:
        """The divergences of the mix with a positive weight."""
        return {name: weight for name, weight in self.weights.items() if name != CE and weight > 0}

    def parameter(self, divergence: str) -> float:
        """The parameter passed to a divergence: jsd's beta, the skew divergences' alpha (unused by the others)."""
        return self.jsd_beta if divergence == "jsd" else self.skew_alpha


def _chunk_sums(
    hidden_CH: torch.Tensor, true_C: torch.Tensor, targets: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, teacher_head: TeacherHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergences [D] (in `config.kd_weights` order) and CE over one chunk: the only place [C, V] exists."""
    logits_CV = head(hidden_CH).float()
    ce_C = logits_CV.logsumexp(-1) - logits_CV.gather(-1, true_C[:, None]).squeeze(-1)
    if not config.kd_weights:
        return ce_C.new_zeros(0), ce_C.sum()
    if config.targets == ONLINE:  # the teacher's logits of this chunk: a constant for the student
        with torch.no_grad():
            targets = {"teacher_logits": teacher_head(targets[TEACHER_HIDDEN]).float()}
    logp_CJ, logq_CJ = TARGETS_FROM[config.targets](Logits(logits_CV), targets, config.temperature)
    kd_D = torch.stack([DIVERGENCES[name](logp_CJ, logq_CJ, config.parameter(name)).sum()
                        for name in config.kd_weights])
    return kd_D, ce_C.sum()


def distillation_loss(
    hidden_BLH: torch.Tensor, head: nn.Linear, batch: dict[str, torch.Tensor], config: LossConfig, step: int = 0,
    teacher_head: TeacherHead | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of a batch, from the student's final hidden states and its output head.

    Args:
        hidden_BLH: the student's final hidden states (after its final norm), [B, L, H].
        head: the student's output layer, H -> V.
        batch: collated store records: `loss_mask` [B, L], `input_ids` [B, L + 1] and the targets of
            `config.targets` (see TARGET_KEYS) when a divergence has weight: for online targets, the teacher's
            final hidden states `TEACHER_HIDDEN` [B, L, G]. They are moved to the device of `hidden_BLH`.
        config: the weighted terms, their representation, temperature, schedule, chunk size, and whether CE is
            Liger's fused kernel.
        step: the optimizer step, for the KD schedule.
        teacher_head: with online targets, the teacher's output head (hidden states [C, G] -> logits [C, V],
            V <= the student's vocabulary); its parameters must not require gradients.

    Returns:
        The scalar loss (module docstring; 0 with a graph when no position is trained), and detached metrics: the
        mean of each weighted divergence by name, "kd" (their weight-averaged mean, without T^2 or schedule; 0
        without divergences), "ce" (mean CE), "kd_scale" (the schedule's factor), "tokens" (positions).
    """
    device = hidden_BLH.device
    mask_BL = batch["loss_mask"].to(device)
    hidden_PH = hidden_BLH[mask_BL]
    true_P = batch["input_ids"][:, 1:].to(device)[mask_BL]
    kd_weights = config.kd_weights
    assert teacher_head is not None or config.targets != ONLINE or not kd_weights, "online targets need the head"
    targets_P = _select_targets(batch, config, mask_BL, true_P) if kd_weights else {}

    num_positions = hidden_PH.shape[0]
    scale = kd_scale(config.kd_schedule, step)
    loss = None
    if config.fused_ce and num_positions:  # with no position, the torch path's empty chunk gives the 0
        kd_sum_D, ce_sum = hidden_PH.new_zeros(0, dtype=torch.float32), liger_ce_sum(hidden_PH, head, true_P)
    elif config.impl == "fused" and not (config.targets == ONLINE and kd_weights):
        loss, kd_sum_D, ce_sum = fused_loss(hidden_PH, true_P, targets_P, head, config, scale)
    else:
        kd_sum_D, ce_sum = _chunked_sums(hidden_PH, true_P, targets_P, head, config, teacher_head)
    kd_mean_D, ce_mean = kd_sum_D / max(num_positions, 1), ce_sum / max(num_positions, 1)
    weights_D = kd_mean_D.new_tensor(list(kd_weights.values()))
    kd_total = (weights_D * kd_mean_D).sum()
    if loss is None:  # the fused path's loss carries its own gradient
        loss = weighted_loss(kd_sum_D, ce_sum, config, scale, num_positions)
    metrics = {name: value.detach() for name, value in zip(kd_weights, kd_mean_D, strict=True)}
    kd = kd_total.detach() / weights_D.sum() if kd_weights else kd_total.detach()
    metrics |= {"kd": kd, "ce": ce_mean.detach(), "kd_scale": torch.tensor(scale), "tokens": mask_BL.sum()}
    return loss, metrics


def _chunked_sums(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, targets_P: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, teacher_head: TeacherHead | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergences [D] and CE over all P positions, `config.chunk_positions` at a time, each chunk under
    activation checkpointing."""
    size = config.chunk_positions
    kd_sum_D = ce_sum = 0.0
    # With no trained position, one empty chunk still runs, so the loss is 0 with a graph through the head.
    for start in range(0, max(hidden_PH.shape[0], 1), size):
        chunk = slice(start, start + size)
        kd_D, ce = checkpoint(
            _chunk_sums, hidden_PH[chunk], true_P[chunk], {key: value[chunk] for key, value in targets_P.items()},
            head, config, teacher_head,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside
        )
        kd_sum_D, ce_sum = kd_sum_D + kd_D, ce_sum + ce
    return kd_sum_D, ce_sum


def _select_targets(
    batch: dict[str, torch.Tensor], config: LossConfig, mask_BL: torch.Tensor, true_P: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The records the representation reads, at the trained positions only: [P, ...] each; with the true next tokens
    `true_P` as TRUE_IDS for a representation that reads them."""
    keys = TARGET_KEYS[config.targets]
    if config.targets == "sampled" and config.sampled_tail_bucket:
        keys += ("topk_ids",)
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(
            f"{config.targets} targets need the batch records {', '.join(keys)}, but {', '.join(missing)} "
            f"are missing (the batch has {', '.join(sorted(batch))}). Load a store built with those targets, choose "
            "other targets, or train with ce alone."
        )
    targets_P = {key: batch[key].to(mask_BL.device)[mask_BL] for key in keys}
    if config.targets in READS_TRUE_IDS:
        targets_P[TRUE_IDS] = true_P
    return _keep_most_probable(targets_P, config.top_k) if config.top_k is not None else targets_P


def _keep_most_probable(targets_P: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The `k` most probable of the stored top-K entries; the mass of the others joins the tail, in log space.

    These are the teacher's top-k ids, as a store built with k would hold them (up to the order of entries whose
    rounded log-probs tie); the tail becomes log(exp(tail) + sum of the dropped probabilities).
    """
    ids_PK, logp_PK = targets_P["topk_ids"], targets_P["topk_logprobs"]
    if k >= ids_PK.shape[-1]:
        return targets_P
    kept_Pk = logp_PK.topk(k, -1).indices
    kept = {"topk_ids": ids_PK.gather(-1, kept_Pk), "topk_logprobs": logp_PK.gather(-1, kept_Pk)}
    if "tail_logmass" in targets_P:
        dropped_P = logp_PK.scatter(-1, kept_Pk, -math.inf).logsumexp(-1)
        kept["tail_logmass"] = torch.logaddexp(targets_P["tail_logmass"], dropped_P)
    return targets_P | kept
