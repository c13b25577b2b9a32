"""Distillation losses: train a student on the store's sparse teacher targets, never on a dense teacher tensor.

Sits between the loader (which collates a batch of store records) and the trainer. The student gives its final
hidden states and its output head; the head is applied here, over the trained positions only, in chunks of
positions, so at most one chunk's [C, V] logits (and, in backward, their gradient) exist at once. Each chunk runs
under non-reentrant activation checkpointing: the forward keeps only the chunk's inputs and backward recomputes
its logits. Everything after the head is in fp32, whatever the autocast dtype.

Definitions (p the teacher, q the student, z the student's logits, T the temperature; every KD is a KL(p || q)
per position, averaged over `loss_mask` positions):

- `topk_tail` (the default for top-k targets): K + 1 buckets, the K stored ids plus one "ghost" bucket holding
  everything else. Teacher: log p_b = the stored log-prob of id b, and log p_tail = `tail_logmass`; tempered as
  log p_b / T renormalised (log-softmax) over the K + 1 buckets. Tempering the tail as one bucket is an
  approximation (the exact tempered tail is sum over tail ids of p_v^(1/T), which the store cannot give); it is
  exact at T = 1, where the renormalisation only removes the fp16 rounding of the stored log-probs. Student:
  q = softmax(z / T) over the full vocabulary, read at the K ids, and q_tail = its mass on the other ids, computed
  as a log-sum-exp over those ids (exact, no 1 - sum q cancellation when the tail is tiny).
- `topk_renorm` (biased, offered for comparison: its optimum puts p_i / sum_k p_k on the kept ids and nothing on
  the tail, an over-confident student): teacher log-softmax(log p_k / T) over the K ids; student
  log-softmax(z_k / T) over the same K ids.
- `sampled` (random-sampling KD, unbiased): N draws from the teacher at T = 1, stored as distinct ids + counts;
  target c_i / N with N = sum of the position's counts; KD = sum_i (c_i/N) (log(c_i/N) - log q_i) with
  q = softmax(z). That is count-weighted CE minus the target's entropy: a KL estimate, whose gradient
  q - c/N is the forward-KL gradient q - p in expectation. Only T = 1 is allowed (see `LossConfig`).
  Stores built with the vllm backend draw from the top-k plus one tail bucket (collated as id TAIL_BUCKET): for
  that bucket q is the student's mass outside the position's top-k ids, so the estimate is unbiased for the
  top-k + ghost-bucket KL (`topk_tail`), not for the full-vocabulary one.
- CE: -log softmax(z)[true next token], never tempered.

loss = alpha * T^2 * KD + (1 - alpha) * CE (T^2 keeps the KD gradient's scale roughly independent of T). With alpha = 0
the KD is not computed (the batch needs no targets) and reported as 0.

Legend: B batch, L positions per row, H hidden size, V vocabulary, P trained positions (loss_mask true), C positions
in a chunk, K top-k ids, J = K + 1 buckets, M sampled entries per position (padding: id 0, count 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Id of the tail bucket in collated sampled targets (draws the vllm backend makes from top-k + one tail bucket).
TAIL_BUCKET = -1

KDFunction = Callable[[torch.Tensor, dict[str, torch.Tensor], float], torch.Tensor]


def _kl(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) over the last axis; buckets with p = 0 (log p = -inf) contribute 0."""
    p_CJ = logp_CJ.exp()
    return torch.where(p_CJ > 0, p_CJ * (logp_CJ - logq_CJ), 0.0).sum(-1)


def topk_tail_kd(logits_CV: torch.Tensor, targets: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """KL over the K stored ids plus one ghost bucket for the rest of the vocabulary. Returns [C]."""
    ids_CK = targets["topk_ids"]
    scaled_CV = logits_CV / temperature
    lse_C1 = scaled_CV.logsumexp(-1, keepdim=True)
    logq_CK = scaled_CV.gather(-1, ids_CK) - lse_C1
    # Student tail: log-sum-exp over the ids outside the top-k, the K ids masked out. The mask is the most negative
    # finite float rather than -inf so that an empty tail (K = V) stays finite: log q_tail is then a huge negative
    # number that the teacher's p_tail = 0 multiplies away, with no inf - inf in logsumexp or its backward.
    logq_tail_C1 = _outside_logmass(scaled_CV, ids_CK, lse_C1)
    logq_CJ = torch.cat([logq_CK, logq_tail_C1], -1)
    teacher_CJ = torch.cat([targets["topk_logprobs"], targets["tail_logmass"][:, None]], -1)
    logp_CJ = F.log_softmax(teacher_CJ / temperature, -1)
    return _kl(logp_CJ, logq_CJ)


def _outside_logmass(scaled_CV: torch.Tensor, ids_CK: torch.Tensor, lse_C1: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the ids `ids_CK`, [C, 1]: a log-sum-exp over the other ids."""
    outside_CV = scaled_CV.scatter(-1, ids_CK, torch.finfo(scaled_CV.dtype).min)
    return outside_CV.logsumexp(-1, keepdim=True) - lse_C1


def topk_renorm_kd(logits_CV: torch.Tensor, targets: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """KL between teacher and student, both renormalised over the K stored ids (biased). Returns [C]."""
    logq_CK = F.log_softmax(logits_CV.gather(-1, targets["topk_ids"]) / temperature, -1)
    logp_CK = F.log_softmax(targets["topk_logprobs"] / temperature, -1)
    return _kl(logp_CK, logq_CK)


def sampled_kd(logits_CV: torch.Tensor, targets: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """KL estimate against the empirical distribution of the teacher's draws, counts / N. Returns [C]."""
    assert temperature == 1.0, "sampled targets are draws at T = 1; LossConfig rejects other temperatures"
    counts_CM, ids_CM = targets["sampled_counts"], targets["sampled_ids"]
    logp_CM = (counts_CM / counts_CM.sum(-1, keepdim=True)).log()  # padding (count 0) -> -inf -> no contribution
    lse_C1 = logits_CV.logsumexp(-1, keepdim=True)
    logq_CM = logits_CV.gather(-1, ids_CM.clamp_min(0)) - lse_C1
    if "topk_ids" in targets:  # draws from top-k + a tail bucket (TAIL_BUCKET): the bucket is the mass outside
        logq_tail_C1 = _outside_logmass(logits_CV, targets["topk_ids"], lse_C1)
        logq_CM = torch.where(ids_CM == TAIL_BUCKET, logq_tail_C1, logq_CM)
    return _kl(logp_CM, logq_CM)


LOSSES: dict[str, KDFunction] = {"topk_tail": topk_tail_kd, "topk_renorm": topk_renorm_kd, "sampled": sampled_kd}
TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "topk_tail": ("topk_ids", "topk_logprobs", "tail_logmass"),
    "topk_renorm": ("topk_ids", "topk_logprobs"),
    "sampled": ("sampled_ids", "sampled_counts"),
}


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the student learns from the targets.

    Attributes:
        kind: KD loss, a key of LOSSES: topk_tail (top-k + ghost tail bucket), topk_renorm (top-k renormalised,
            biased), sampled (random-sampling KD).
        alpha: weight of the KD term; 1 - alpha weights CE on the true next tokens.
        temperature: softmax temperature of the KD term (the loss is scaled by T^2); must be 1 with sampled.
        chunk_positions: positions whose student logits exist at once.
        sampled_tail_bucket: the store's sampled draws include a tail bucket (id TAIL_BUCKET once collated), whose
            student probability is the mass outside the position's top-k ids; the batch must hold `topk_ids`.
    """

    kind: str
    alpha: float = 0.5
    temperature: float = 1.0
    chunk_positions: int = 1024
    sampled_tail_bucket: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss kind: {self.kind!r} is not one of {', '.join(LOSSES)}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: expected a KD weight in [0, 1], got {self.alpha}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a positive temperature, got {self.temperature}.")
        if self.kind == "sampled" and self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} cannot be used with sampled targets: the stored draws come from the "
                "teacher at temperature 1, so counts / N estimates the untempered distribution, and a tempered one "
                "(proportional to p^(1/T)) cannot be recovered from draws. Use temperature 1.0, or a top-k loss."
            )
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions: expected a positive number of positions, got {self.chunk_positions}.")


def _chunk_sums(
    hidden_CH: torch.Tensor,
    true_C: torch.Tensor,
    targets: dict[str, torch.Tensor],
    head: nn.Linear,
    kd_fn: KDFunction | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD and CE over one chunk of positions; the only place [C, V] logits exist."""
    logits_CV = head(hidden_CH).float()
    ce_C = logits_CV.logsumexp(-1) - logits_CV.gather(-1, true_C[:, None]).squeeze(-1)
    kd = kd_fn(logits_CV, targets, temperature).sum() if kd_fn is not None else ce_C.new_zeros(())
    return kd, ce_C.sum()


def distillation_loss(
    hidden_BLH: torch.Tensor, head: nn.Linear, batch: dict[str, torch.Tensor], config: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of a batch, from the student's final hidden states and its output head.

    Args:
        hidden_BLH: the student's final hidden states (after its final norm), [B, L, H].
        head: the student's output layer, H -> V.
        batch: collated store records: `loss_mask` [B, L], `input_ids` [B, L + 1] and the targets of
            `config.kind` (see TARGET_KEYS). They are moved to the device of `hidden_BLH`.
        config: which KD loss, its weight, temperature and chunk size.

    Returns:
        The scalar loss alpha * T^2 * KD + (1 - alpha) * CE, each a mean over loss_mask positions (0 with a graph
        when there are none), and detached metrics {"kd": mean KD, "ce": mean CE, "tokens": number of positions}.
    """
    device = hidden_BLH.device
    mask_BL = batch["loss_mask"].to(device)
    hidden_PH = hidden_BLH[mask_BL]
    true_P = batch["input_ids"][:, 1:].to(device)[mask_BL]
    kd_fn = LOSSES[config.kind] if config.alpha > 0 else None
    keys = TARGET_KEYS[config.kind] + (("topk_ids",) if config.kind == "sampled" and config.sampled_tail_bucket else ())
    targets_P = {} if kd_fn is None else _select_targets(batch, keys, config.kind, mask_BL)

    num_positions = hidden_PH.shape[0]
    size = config.chunk_positions
    kd_sum = ce_sum = 0.0
    # With no trained position, one empty chunk still runs, so the loss is 0 with a graph through the head.
    for start in range(0, max(num_positions, 1), size):
        chunk = slice(start, start + size)
        kd, ce = checkpoint(
            _chunk_sums,
            hidden_PH[chunk],
            true_P[chunk],
            {key: value[chunk] for key, value in targets_P.items()},
            head,
            kd_fn,
            config.temperature,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside
        )
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    kd_mean, ce_mean = kd_sum / max(num_positions, 1), ce_sum / max(num_positions, 1)
    loss = config.alpha * config.temperature**2 * kd_mean + (1 - config.alpha) * ce_mean
    metrics = {"kd": kd_mean.detach(), "ce": ce_mean.detach(), "tokens": mask_BL.sum()}
    return loss, metrics


def _select_targets(batch: dict[str, torch.Tensor], keys: tuple[str, ...], kind: str,
                    mask_BL: torch.Tensor) -> dict[str, torch.Tensor]:
    """The targets `keys` of loss `kind`, at the trained positions only: [P, ...] each."""
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(
            f"loss kind {kind!r} needs the batch records {', '.join(keys)}, but {', '.join(missing)} "
            f"are missing (the batch has {', '.join(sorted(batch))}). Load a store built with those targets, choose "
            "another loss kind, or set alpha to 0 for plain CE."
        )
    return {key: batch[key].to(mask_BL.device)[mask_BL] for key in keys}
