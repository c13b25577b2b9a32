"""Distillation losses: a weighted mix of divergences on the store's sparse targets, an on-policy reverse KL on the
student's own samples, plus CE; never a dense teacher (but for online KD, the baseline: a teacher run beside the
student, one chunk of its logits at a time).

Sits between the loader (which collates a batch of store records, `student_train.collate`) and the trainer; its
options are a `LossConfig` (`student_train.loss_config`). The student gives its final hidden states and its output
head; the head is applied here, over the trained positions only, in chunks of positions, so at most one chunk's
[C, V] logits (and, in backward, their gradient) exist at once. By default (`LossConfig.impl` "fused") each chunk's
logits are computed once and their gradient is built in the forward pass (`student_train.fused_loss`); with
"checkpoint", and always with online targets, each chunk runs under non-reentrant activation checkpointing: the
forward keeps only the chunk's inputs and backward recomputes its logits. Both give the same loss and gradients.
Everything after the head is in fp32, whatever the autocast dtype.

The loss of a batch, each term a mean over `loss_mask` positions:

    loss = s(step) * (T^2 * sum_d w_d * D_d(p, q)  +  w_r * R)  +  w_ce * CE

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
- R (`rollout_rkl`), on a store built over the student's own rollouts (`teacher-cache generate --model STUDENT`,
  then `teacher-cache build` over them): a sample estimate of sum over the student's positions of
  KL(q(.|prefix) || p(.|prefix)), the prefixes being the student's own samples, from the teacher's stored log-prob
  of each sampled token x (`true_logprob`) and the generator's (`behaviour_logprob`, NaN where x was not drawn: a
  prompt, template, appended EOS or padding, or every position of a mixed-in store without rollouts, which adds
  0). Per such position, with a = log q(x) - log p(x) and the
  truncated importance weight w = min(q(x) / mu(x), C) (`LossConfig.rollout_clip`, for the student's drift since
  it generated), its value is w a and its gradient w a grad log q(x): the score-function (policy) gradient of the
  reverse KL, with the prefix distribution not differentiated, as GKD and per-token on-policy distillation do (see
  `student_train.divergences.rollout_rkl`). It reads no target representation and needs T = 1; not with online
  targets.
- CE: -log softmax(z)[true next token], never tempered, never scheduled.
- w: the weights of `LossConfig.weights`, used as given (they need not sum to 1). A term of weight 0 is not
  computed; with no divergence the batch needs no targets, and with no KD term the reported KD is 0.
- s(step): the KD schedule (`kd_scale`), a factor in [0, 1] on every divergence and on R, from the optimizer step.

A student whose tokenizer differs from the teacher's trains with the cross-tokenizer targets (chunks, mapped,
sorted): the same loss, computed by `student_train.cross_losses` over a batch the cross-tokenizer transform made.

A loss of CE alone may instead come from Liger-kernel's fused linear cross-entropy on CUDA (`LossConfig.fused_ce`;
see `student_train.liger`), which gives the same CE and gradients without the checkpointed chunks.

Legend: B batch, L positions per row, H hidden size (G the online teacher's), V vocabulary, P trained positions
(loss_mask true), C positions in a chunk, D KD terms in the mix (divergences, rollout_rkl), K stored top-k ids
(k kept of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from student_train.cross_losses import CROSS_KEYS, cross_sums, fused_mapped
from student_train.divergences import (
    BEHAVIOUR_LOGPROB,
    CROSS_TARGETS,
    DIVERGENCES,
    ONLINE,
    READS_TRUE_IDS,
    REPRESENTATIONS,
    ROLLOUT_KEYS,
    TARGET_KEYS,
    TARGETS_FROM,
    TRUE_IDS,
    Logits,
)
from student_train.fused_loss import fused_loss, kd_terms, weighted_loss
from student_train.liger import liger_ce_sum
from student_train.loss_config import ROLLOUT, LossConfig, kd_scale

__all__ = ["DIVERGENCES", "ONLINE", "REPRESENTATIONS", "TARGETS_FROM", "TEACHER_HIDDEN", "distillation_loss"]

# The batch record of the online teacher's final hidden states [B, L, G]; see TARGET_KEYS.
TEACHER_HIDDEN = TARGET_KEYS[ONLINE][0]
# The online teacher's output head with its logit post-processing: hidden states [C, G] -> logits [C, V].
TeacherHead = Callable[[torch.Tensor], torch.Tensor]


def _chunk_sums(
    hidden_CH: torch.Tensor, true_C: torch.Tensor, targets: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, teacher_head: TeacherHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed KD terms [D] (in `config.kd_weights` order), CE and rollout_rkl importance weights over one chunk: the
    only place [C, V] exists."""
    logits_CV = head(hidden_CH).float()
    ce_C = logits_CV.logsumexp(-1) - logits_CV.gather(-1, true_C[:, None]).squeeze(-1)
    if not config.kd_weights:
        return ce_C.new_zeros(0), ce_C.sum(), ce_C.new_zeros(())
    if config.targets == ONLINE:  # the teacher's logits of this chunk: a constant for the student
        with torch.no_grad():
            targets = {"teacher_logits": teacher_head(targets[TEACHER_HIDDEN]).float()}
    kd, weight_sum = kd_terms(Logits(logits_CV), -ce_C, targets, config)
    return torch.stack(kd), ce_C.sum(), weight_sum


def distillation_loss(
    hidden_BLH: torch.Tensor, head: nn.Linear, batch: dict[str, torch.Tensor], config: LossConfig, step: int = 0,
    teacher_head: TeacherHead | None = None, rollouts_optional: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of a batch, from the student's final hidden states and its output head.

    Args:
        hidden_BLH: the student's final hidden states (after its final norm), [B, L, H].
        head: the student's output layer, H -> V.
        batch: collated store records: `loss_mask` [B, L], `input_ids` [B, L + 1], the targets of
            `config.targets` (see TARGET_KEYS) when a divergence has weight (for online targets, the teacher's
            final hidden states `TEACHER_HIDDEN` [B, L, G]; for cross-tokenizer targets, those of
            `cross_losses.CROSS_KEYS`), and ROLLOUT_KEYS [B, L] when rollout_rkl has weight. They are moved to the
            device of `hidden_BLH`.
        config: the weighted terms, their representation, temperature, schedule, chunk size, and whether CE is
            Liger's fused kernel.
        step: the optimizer step, for the KD schedule.
        teacher_head: with online targets, the teacher's output head (hidden states [C, G] -> logits [C, V],
            V <= the student's vocabulary); its parameters must not require gradients.
        rollouts_optional: the batch is of a store in a mix (`student_train.mixture_loader`): without
            `behaviour_logprob` it holds no token the student drew, and adds 0 to rollout_rkl instead of an error.

    Returns:
        The scalar loss (module docstring; 0 with a graph when no position is trained), and detached metrics: the
        mean of each weighted KD term by name (a divergence, or rollout_rkl's estimate), "kd" (their
        weight-averaged mean, without T^2 or schedule; 0 without KD terms), "ce" (mean CE), "kd_scale" (the
        schedule's factor), "tokens" (positions); with rollout_rkl, "rollout_weight": its mean importance weight
        over the positions with a behaviour log-prob (0 without any).
    """
    device = hidden_BLH.device
    mask_BL = batch["loss_mask"].to(device)
    hidden_PH = hidden_BLH[mask_BL]
    true_P = batch["input_ids"][:, 1:].to(device)[mask_BL]
    kd_weights = config.kd_weights
    assert teacher_head is not None or config.targets != ONLINE or not kd_weights, "online targets need the head"
    cross = config.targets in CROSS_TARGETS and bool(config.divergence_weights)
    targets_P = {} if cross else _select_targets(batch, config, mask_BL, true_P, rollouts_optional)

    num_positions = hidden_PH.shape[0]
    scale = kd_scale(config.kd_schedule, step)
    loss = None
    weight_sum = 0.0  # rollout_rkl's importance weights, summed
    if cross:
        _require(batch, CROSS_KEYS[config.targets], f"{config.targets} targets need",
                 "The cross-tokenizer batch transform adds them, for a student whose tokenizer differs from the "
                 "teacher's; a student with the teacher's tokenizer trains with --targets-from topk_tail.")
        if config.targets == "mapped" and config.impl == "fused":
            loss, kd_sum_D, ce_sum = fused_mapped(hidden_PH, true_P, head, batch, mask_BL, config, scale)
        else:
            kd_sum_D, ce_sum = cross_sums(hidden_PH, true_P, head, batch, mask_BL, config)
    elif config.fused_ce and num_positions:  # with no position, the torch path's empty chunk gives the 0
        kd_sum_D, ce_sum = hidden_PH.new_zeros(0, dtype=torch.float32), liger_ce_sum(hidden_PH, head, true_P)
    elif config.impl == "fused" and not (config.targets == ONLINE and config.divergence_weights):
        loss, kd_sum_D, ce_sum, weight_sum = fused_loss(hidden_PH, true_P, targets_P, head, config, scale)
    else:
        kd_sum_D, ce_sum, weight_sum = _chunked_sums(hidden_PH, true_P, targets_P, head, config, teacher_head)
    kd_mean_D, ce_mean = kd_sum_D / max(num_positions, 1), ce_sum / max(num_positions, 1)
    weights_D = kd_mean_D.new_tensor(list(kd_weights.values()))
    kd_total = (weights_D * kd_mean_D).sum()
    if loss is None:  # the fused path's loss carries its own gradient
        loss = weighted_loss(kd_sum_D, ce_sum, config, scale, num_positions)
    metrics = {name: value.detach() for name, value in zip(kd_weights, kd_mean_D, strict=True)}
    kd = kd_total.detach() / weights_D.sum() if kd_weights else kd_total.detach()
    metrics |= {"kd": kd, "ce": ce_mean.detach(), "kd_scale": torch.tensor(scale), "tokens": mask_BL.sum()}
    if ROLLOUT in kd_weights:
        drawn = int(targets_P[BEHAVIOUR_LOGPROB].isfinite().sum())
        metrics["rollout_weight"] = weight_sum / max(drawn, 1)
    return loss, metrics


def _chunked_sums(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, targets_P: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, teacher_head: TeacherHead | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed KD terms [D], CE and rollout_rkl importance weights over all P positions, `config.chunk_positions` at
    a time, each chunk under activation checkpointing."""
    size = config.chunk_positions
    kd_sum_D = ce_sum = weight_sum = 0.0
    # With no trained position, one empty chunk still runs, so the loss is 0 with a graph through the head.
    for start in range(0, max(hidden_PH.shape[0], 1), size):
        chunk = slice(start, start + size)
        kd_D, ce, weights = checkpoint(
            _chunk_sums, hidden_PH[chunk], true_P[chunk], {key: value[chunk] for key, value in targets_P.items()},
            head, config, teacher_head,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside
        )
        kd_sum_D, ce_sum, weight_sum = kd_sum_D + kd_D, ce_sum + ce, weight_sum + weights
    return kd_sum_D, ce_sum, weight_sum


def _select_targets(
    batch: dict[str, torch.Tensor], config: LossConfig, mask_BL: torch.Tensor, true_P: torch.Tensor,
    rollouts_optional: bool = False,
) -> dict[str, torch.Tensor]:
    """The records the weighted KD terms read, at the trained positions only: [P, ...] each. Those of the
    representation when a divergence has weight, with the true next tokens `true_P` as TRUE_IDS for a
    representation that reads them; ROLLOUT_KEYS when rollout_rkl has weight (with `rollouts_optional`, a batch
    without `behaviour_logprob` gets NaN there: no position was drawn by the student, so each adds 0)."""
    targets_P = {}
    if config.divergence_weights:
        keys = TARGET_KEYS[config.targets]
        if config.targets == "sampled" and config.sampled_tail_bucket:
            keys += ("topk_ids",)
        _require(batch, keys, f"{config.targets} targets need",
                 "Load a store built with those targets, choose other targets, or train with ce alone.")
        targets_P = {key: batch[key].to(mask_BL.device)[mask_BL] for key in keys}
        if config.targets in READS_TRUE_IDS:
            targets_P[TRUE_IDS] = true_P
        if config.top_k is not None:
            targets_P = _keep_most_probable(targets_P, config.top_k)
    if ROLLOUT in config.kd_weights:
        if rollouts_optional and BEHAVIOUR_LOGPROB not in batch:
            batch = batch | {BEHAVIOUR_LOGPROB: torch.full(batch["loss_mask"].shape, math.nan)}
        _require(batch, ROLLOUT_KEYS, f"{ROLLOUT} needs",
                 "Load a store built over the student's rollouts (`teacher-cache build --dataset ROLLOUTS` over the "
                 f"output of `teacher-cache generate --model STUDENT`), or drop {ROLLOUT}.")
        targets_P |= {key: batch[key].to(mask_BL.device)[mask_BL] for key in ROLLOUT_KEYS}
    return targets_P


def _require(batch: dict[str, torch.Tensor], keys: tuple[str, ...], what: str, fix: str) -> None:
    """The batch holds the records `keys` that a term reads (`what`: "... need(s)").

    Raises:
        ValueError: some are missing; the message ends with `fix`.
    """
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"{what} the batch records {', '.join(keys)}, but {', '.join(missing)} are missing "
                         f"(the batch has {', '.join(sorted(batch))}). {fix}")


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
