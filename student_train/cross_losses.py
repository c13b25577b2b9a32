"""Distillation losses for a student whose tokenizer differs from the teacher's, from an unchanged store: the
targets `mapped`, `sorted` and `chunks` (`divergences.CROSS_TARGETS`).

Sits beside `student_train.losses`, whose `distillation_loss` dispatches here when `LossConfig.targets` is one of
them, with the same loss, metrics and return contract. The batch is already in the student's token ids: the
cross-tokenizer batch transform (`student_train.cross_tokenizer`) aligns the two tokenizations of each row's text by
characters (`storage.alignment`: text chunks, stretches of text where both tokenizations start and end at the same
characters) and adds the records read here. Student position j predicts student token j + 1.

Targets (T the temperature, z the student's logits; the divergences are those of `student_train.divergences`):
- `mapped`: the teacher's next-token distribution at aligned boundaries (`kd_mask`: positions where the student's
  next token starts where a teacher token starts), its top-k carried to student ids by string: `topk_ids` holds the
  student id whose string is exactly the teacher token's, -1 where the student has none. J = K + 1. Teacher: the
  mapped entries, plus one tail bucket holding the stored tail mass and the unmapped entries' mass (in log space),
  renormalised and tempered together as `topk_tail` does (an unmapped entry is an empty bucket on both sides).
  Student: softmax(z / T) at the mapped ids, and its mass on every other id in the tail bucket. With every entry
  mapped (the same tokenizer) it is `topk_tail`. Biases: beyond `topk_tail`'s (the tail tempered as one bucket), it
  equates "the teacher's next token is the string s" with "the student's next token is s", while the student may
  spell the same continuation with other tokens (s split in two, or a longer token starting with s); so it is exact
  where the vocabularies agree on the continuation and coarse elsewhere, and it trains only the aligned boundaries.
- `sorted`: Universal Logit Distillation (ULD, Boizard et al. 2024), which needs no vocabulary map: the L1 distance
  between the two distributions' probabilities sorted in decreasing order, at the same `kd_mask` positions. J = K + 1.
  Teacher: its K stored probabilities (renormalised with the tail and tempered as `topk_tail`) sorted decreasing,
  plus the tail mass as one bucket. Student: its own K largest probabilities of softmax(z / T), sorted decreasing,
  plus its remaining mass as one bucket. `tv` over these buckets is ULD / 2 over sparse targets: the paper's L1 over
  the full sorted vectors (the shorter vocabulary padded with zeros) when the teacher's tail and the student's rest
  each count as one bucket. That is a lower bound of the full sorted L1 (merging ranks K + 1 onwards into one bucket can
  only shrink an L1 distance), equal to it when the teacher's top-k holds all its mass: the student's lower ranks
  then all face zeros, and their L1 is their summed mass. Other divergences are allowed over the same buckets.
  Biases: the target knows how peaked the teacher is, not which token it expects: it shapes the student's
  confidence only (ULD adds it to CE, which says which token).
- `chunks`: approximate likelihood matching (ALM, Minixhofer et al. 2025; tokenkit). Each usable text chunk's
  log-likelihood under the teacher, LL_t (`chunk_logprob`: the sum of the stored log-probs of the chunk's true
  teacher tokens), and under the student, LL_s (the sum of log q(true next token) over the student positions
  pointing at the chunk, `chunk_ids`), each turned into a two-bucket distribution over the event "this chunk":
  log p = [a, log(1 - e^a)] with a = LL_t / tau (a clamped to <= -1e-6, as tokenkit does, so that a chunk of
  probability 1 stays finite), the same for the student; J = 2. The chunk's term is tau * D(p, q). The chunk
  temperature tau (`LossConfig.chunk_temperature`) keeps a long chunk's probability away from 0, where both
  distributions would be [0, 1] and the term would vanish; the factor tau keeps the gradient's scale independent of
  tau: as tau grows, tau * forward binary KL tends to (LL_t - LL_s) - LL_t log(LL_t / LL_s), a divergence between the
  two log-likelihoods that does not depend on tau. T must be 1. Biases: a model's probability of a text chunk is the
  sum over every tokenization of it; LL_t and LL_s are those of one tokenization each (approximate, hence the name).
  A chunk counts once, however many student tokens it spans, and a chunk of a single token on both sides (the same
  tokenizer) is the binary divergence of the two next-token log-probs of the true token.

The loss is that of `student_train.losses`: s(step) * T^2 * sum_d w_d D_d + w_ce CE, every term a sum (over the
`kd_mask` positions, or over the usable chunks) divided by the number of trained positions P (`loss_mask`). A trained
position outside `kd_mask` has no teacher distribution: with `mapped` and `sorted`, each divergence term counts the
CE of its true token there instead (a one-hot teacher; divided by T^2, so that the loss weighs it by w_d exactly),
so that every trained position carries the divergences' weight (left out, the tokens a student splits finer than
the teacher would train on CE's weight alone). Chunk_ids of -1 and chunks whose `chunk_logprob` is NaN add exactly 0
to the value and gradient.

`mapped` reads the logits only as the store's representations do (log-normaliser, the logits of some ids, the
log-sum-exp outside them), so with `LossConfig.impl` "fused" it runs on the fused path of `student_train.fused_loss`
(`fused_mapped`). Otherwise, and always for `sorted` and `chunks`, the trained positions are computed a chunk of
positions at a time (`LossConfig.chunk_positions`), each under non-reentrant activation checkpointing as in
`losses`, so one [C, V] logits block exists at once. For `mapped` and `sorted`, the `kd_mask` positions go first,
their divergences summed inside each chunk, then the others with their CE alone (a position outside `kd_mask` never
enters a divergence, whatever its records hold). For `chunks` each chunk gives the per-position log q(true next
token), [P], which are then summed per text chunk (index_add) and compared, the gradient flowing back through the
checkpoints.

Legend: B batch, L student positions per row, H hidden size, V student vocabulary, P trained positions (loss_mask
true), C positions in a chunk of positions, K teacher top-k entries, J buckets, D divergences in the mix, A text
chunks per row in the records, N = B * A text chunks of the batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from student_train.divergences import DIVERGENCES, Logits, Representation, mapped
from student_train.fused_loss import fused_loss
from student_train.loss_config import CE, LossConfig

# The records the cross-tokenizer batch transform adds. [B, L] bool: positions with mapped targets (a subset of
# loss_mask); elsewhere the top-k records hold filler (ids -1, log-probs -inf, tail 0), which no divergence reads.
KD_MASK = "kd_mask"
# [B, L] int64: the text chunk (an index into the row's chunks) of the student token each position predicts, -1 where
# that token is in no usable chunk.
CHUNK_IDS = "chunk_ids"
# [B, A] float32: the teacher's log-likelihood of each text chunk of the row; NaN for a chunk that is not usable, and
# for padding.
CHUNK_LOGPROB = "chunk_logprob"
# The largest log-likelihood / tau a chunk keeps, so that log(1 - e^a) stays finite (tokenkit's clamp).
MAX_CHUNK_LOGPROB = -1e-6


def sorted_by_rank(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The teacher's K stored probabilities and the student's K largest, each sorted decreasing, plus one bucket
    for the rest of each, J = K + 1."""
    teacher_CJ = torch.cat([targets["topk_logprobs"], targets["tail_logmass"][:, None]], -1)
    logp_CJ = F.log_softmax(teacher_CJ / temperature, -1)
    logp_CK = logp_CJ[:, :-1].sort(-1, descending=True).values
    ids_CK = z.top_ids(logp_CK.shape[-1])  # decreasing, at every temperature
    logq_CJ = torch.cat([z.gather(ids_CK, temperature), z.outside_lse(ids_CK, temperature)], -1) - z.lse(temperature)
    return torch.cat([logp_CK, logp_CJ[:, -1:]], -1), logq_CJ


# The cross targets compared one position at a time, and the batch records each target reads.
POSITION_TARGETS: dict[str, Representation] = {"mapped": mapped, "sorted": sorted_by_rank}
CROSS_KEYS: dict[str, tuple[str, ...]] = {
    "mapped": ("topk_ids", "topk_logprobs", "tail_logmass", KD_MASK),
    "sorted": ("topk_logprobs", "tail_logmass", KD_MASK),
    "chunks": (CHUNK_IDS, CHUNK_LOGPROB),
}


def cross_sums(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, head: nn.Linear, batch: dict[str, torch.Tensor],
    mask_BL: torch.Tensor, config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergences [D] (in `config.kd_weights` order) and summed CE over a batch with cross targets.

    Args:
        hidden_PH: the student's final hidden states at the trained positions.
        true_P: the true next tokens (student ids).
        head: the student's output layer, H -> V.
        batch: the collated batch with the records CROSS_KEYS[config.targets] (module docstring).
        mask_BL: the trained positions (`loss_mask`), on the device of `hidden_PH`.
        config: the loss options; `config.targets` is one of CROSS_TARGETS and the mix has no rollout_rkl.

    Returns:
        (summed divergences [D], summed CE), differentiable with respect to `hidden_PH` and the head's parameters.
    """
    device = hidden_PH.device
    if config.targets == "chunks":
        kd_sum_D, logq_P = _chunked(hidden_PH, true_P, {}, head, config)
        chunk_P = _global_chunk_ids(batch[CHUNK_IDS].to(device), mask_BL, batch[CHUNK_LOGPROB].shape[-1])
        kd_sum_D = _chunk_sums(logq_P, chunk_P, batch[CHUNK_LOGPROB].to(device).reshape(-1), config)
        return kd_sum_D, -logq_P.sum()
    # The kd_mask positions apart from the others: a divergence never meets the filler. The others have no teacher
    # distribution; each divergence term takes their CE instead (the true token as the teacher; / T^2, which the
    # loss's T^2 undoes), so that every trained position carries the same weight.
    kd_P = batch[KD_MASK].to(device)[mask_BL]
    targets_P = {key: batch[key].to(device)[mask_BL][kd_P] for key in CROSS_KEYS[config.targets] if key != KD_MASK}
    kd_sum_D, logq_kd = _chunked(hidden_PH[kd_P], true_P[kd_P], targets_P, head, config)
    _, logq_rest = _chunked(hidden_PH[~kd_P], true_P[~kd_P], {}, head, config)
    return kd_sum_D - logq_rest.sum() / config.temperature**2, -(logq_kd.sum() + logq_rest.sum())


def fused_mapped(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, head: nn.Linear, batch: dict[str, torch.Tensor],
    mask_BL: torch.Tensor, config: LossConfig, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mapped` on the fused path (`student_train.fused_loss`, for `LossConfig.impl` "fused"): (loss, summed
    divergences [D], summed CE), the loss and sums of `cross_sums`, with each chunk's logits computed once.

    The `kd_mask` positions run with the mix as it is; the others with CE alone, weighted by what the loss gives them
    (their CE in each divergence term, s(step) w_d, plus w_ce); both losses are means over their own positions,
    turned into shares of the P trained positions.
    """
    device = hidden_PH.device
    kd_P = batch[KD_MASK].to(device)[mask_BL]
    targets_P = {key: batch[key].to(device)[mask_BL][kd_P] for key in CROSS_KEYS["mapped"] if key != KD_MASK}
    loss_kd, kd_sum_D, ce_kd, _ = fused_loss(hidden_PH[kd_P], true_P[kd_P], targets_P, head, config, scale)
    ce_only = dataclasses.replace(config, weights={CE: 1.0})
    loss_rest, _, ce_rest, _ = fused_loss(hidden_PH[~kd_P], true_P[~kd_P], {}, head, ce_only, scale)
    rest_weight = scale * sum(config.divergence_weights.values()) + config.weights.get(CE, 0.0)
    positions, kd_positions = hidden_PH.shape[0], int(kd_P.sum())
    loss = (loss_kd * kd_positions + rest_weight * loss_rest * (positions - kd_positions)) / max(positions, 1)
    return loss, kd_sum_D + ce_rest / config.temperature**2, ce_kd + ce_rest


def _chunked(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, targets_P: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed divergences [D] of the position targets, empty without `targets_P`; log q of the true next tokens
    [P]), `config.chunk_positions` positions at a time, each chunk under activation checkpointing."""
    size = config.chunk_positions
    kd_sum_D, logq_parts = 0.0, []
    # With no position, one empty chunk still runs, so the loss is 0 with a graph through the head.
    for start in range(0, max(hidden_PH.shape[0], 1), size):
        rows = slice(start, start + size)
        kd_D, logq_C = checkpoint(
            _positions, hidden_PH[rows], true_P[rows], {key: value[rows] for key, value in targets_P.items()}, head,
            config,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside
        )
        kd_sum_D = kd_sum_D + kd_D
        logq_parts.append(logq_C)
    return kd_sum_D, torch.cat(logq_parts)


def _positions(
    hidden_CH: torch.Tensor, true_C: torch.Tensor, targets_C: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed divergences [D] of the position targets `targets_C`, empty without them; log q of the true next
    tokens [C]) of one chunk of positions: the only place [C, V] exists."""
    logits_CV = head(hidden_CH)
    logits_CV = logits_CV.to(torch.promote_types(logits_CV.dtype, torch.float32))  # fp32, or float64 kept
    logq_C = logits_CV.gather(-1, true_C[:, None]).squeeze(-1) - logits_CV.logsumexp(-1)
    if not targets_C:
        return logq_C.new_zeros(0), logq_C
    logp_CJ, logq_CJ = POSITION_TARGETS[config.targets](Logits(logits_CV), targets_C, config.temperature)
    sums = [DIVERGENCES[name](logp_CJ, logq_CJ, config.parameter(name)).sum() for name in config.kd_weights]
    return torch.stack(sums), logq_C


def _global_chunk_ids(chunk_ids_BL: torch.Tensor, mask_BL: torch.Tensor, chunks_per_row: int) -> torch.Tensor:
    """[P] the text chunk of each trained position among the batch's N = B * A, -1 for none."""
    rows_BL = torch.arange(mask_BL.shape[0], device=mask_BL.device)[:, None].expand_as(mask_BL)
    chunk_P = chunk_ids_BL[mask_BL]
    return torch.where(chunk_P >= 0, rows_BL[mask_BL] * chunks_per_row + chunk_P, -1)


def _chunk_sums(logq_P: torch.Tensor, chunk_P: torch.Tensor, teacher_N: torch.Tensor,
                config: LossConfig) -> torch.Tensor:
    """Summed tau * D(p, q) [D] over the usable text chunks, from the student's log-probs of the true tokens [P],
    each position's chunk [P] (-1 for none) and the teacher's log-likelihood of each chunk [N] (NaN: not usable)."""
    pointing_P = chunk_P >= 0
    student_N = logq_P.new_zeros(teacher_N.shape).index_add(0, chunk_P[pointing_P], logq_P[pointing_P])
    usable_N = ~teacher_N.isnan()
    teacher_N = torch.where(usable_N, teacher_N.to(student_N.dtype), 0.0)  # any finite value: masked below
    tau = config.chunk_temperature
    logp_N2, logq_N2 = binary_chunk(teacher_N, tau), binary_chunk(student_N, tau)
    sums = [tau * torch.where(usable_N, DIVERGENCES[name](logp_N2, logq_N2, config.parameter(name)), 0.0).sum()
            for name in config.kd_weights]
    return torch.stack(sums)


def binary_chunk(loglik_N: torch.Tensor, tau: float) -> torch.Tensor:
    """log [P(chunk), 1 - P(chunk)] with P(chunk) = exp(loglik / tau), its log clamped to <= MAX_CHUNK_LOGPROB:
    [N, 2]."""
    a_N = (loglik_N / tau).clamp(max=MAX_CHUNK_LOGPROB)
    return torch.stack([a_N, _log1mexp(a_N)], -1)


def _log1mexp(a_N: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0, accurate on both sides of -log 2 (Maechler 2012): both branches finite there."""
    return torch.where(a_N > -math.log(2), torch.log(-torch.expm1(a_N)), torch.log1p(-torch.exp(a_N)))
