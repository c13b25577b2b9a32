"""The fused distillation loss: each chunk's logits computed once, their gradient built in the forward pass.

An alternative to the checkpointed chunks of `student_train.losses` (`LossConfig.impl`, "fused" by default for the
store's targets and for CE alone), with the same loss, metrics and gradients. There, each chunk's [C, V] logits are
computed in forward, discarded, computed again in backward, and autograd runs back through the representation's
full-vocabulary reductions. Here they are computed once: a representation reads the logits only through `Logits`,
whose reductions have closed-form gradients (`student_train.logit_reads`), and the loss is linear in the chunk sums
with weights known in forward:

    loss = sum_d c_d * (summed KD term d) + c_ce * (summed CE),  c_d = s(step) T^2 w_d / P,  c_ce = w_ce / P,

the KD terms being the divergences and rollout_rkl (whose surrogate reads the logits only at the true next token,
through the same lse and gather reads as CE; `kd_terms`, shared with the checkpointed path).

Per chunk: logits = head(h) (in the autocast dtype if any, then fp32, as the checkpointed path; float64 stays
float64, for exact checks); the reads answered without autograd as small leaves (`LogitReads`); the representation,
the divergences and CE on those leaves, and `torch.autograd.grad` of the chunk's weighted sum with respect to them (a
graph of [C, J] tensors only); then dL/dz written over the logits (`logits_grad_`) and pulled back through the head:
dh = dz W, dW += dz^T h, db += sum dz, the products in the head's compute dtype. One chunk's [C, V] logits exist
at a time, with smaller temporaries beside them (`logit_reads`: a block of rows at a time for the exponentials, and a
quarter of the chunk for the gradient's terms at a second temperature).

`_FusedLoss`, a `torch.autograd.Function` over (hidden states, head weight, head bias), runs that loop and keeps
dh [P, H], dW [V, H] and db [V] until backward, which scales them by the incoming gradient. The head's parameters
are inputs of the Function, so autograd accumulates their gradients as for `head(h)`: a weight tied to the input
embedding gets both, and DDP's and FSDP2's gradient hooks see them as usual. The graph holds those buffers (the
size of the head's own gradient, and of the hidden states), not logits; backward frees them (retain_graph keeps
them for another). The sums the Function also returns are detached: metrics only. Without gradients (evaluation,
under no_grad) the same loop computes the values alone.

Not covered here: online targets (the teacher's logits are dense; `losses` keeps them on the checkpointed path),
and heads other than a plain linear layer (the Function reads `head.weight` and `head.bias`, not `head.forward`).

Legend: P trained positions, C positions in a chunk, H hidden size, V vocabulary, J entries a read covers, D
KD terms in the mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from student_train.divergences import DIVERGENCES, TARGETS_FROM, Logits, rollout_rkl
from student_train.logit_reads import LogitReads, Probe, logits_grad_
from student_train.loss_config import CE, ROLLOUT, LossConfig


def term_weights(config: LossConfig, scale: float, positions: int) -> tuple[list[float], float]:
    """(c_d for each KD term of `config.kd_weights`, c_ce): the loss's derivatives with respect to the summed
    KD terms and the summed CE (module docstring; T is 1 with rollout_rkl)."""
    per_position = 1 / max(positions, 1)
    kd = [scale * config.temperature**2 * weight * per_position for weight in config.kd_weights.values()]
    return kd, config.weights.get(CE, 0.0) * per_position


def fused_loss(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, targets_P: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of `losses.distillation_loss` over P trained positions, and its sums, by the fused path.

    Args:
        hidden_PH: the student's final hidden states at the trained positions.
        true_P: the true next tokens.
        targets_P: the records the representation and rollout_rkl read, [P, ...] each (none without a KD term).
        head: the student's output layer (a plain linear layer: its weight and bias are read).
        config: the `LossConfig`; its targets must not be online.
        scale: the KD schedule's factor at this step.

    Returns:
        (loss, summed KD terms [D], summed CE, summed rollout_rkl importance weights): the scalar loss,
        differentiable with respect to `hidden_PH` and the head's parameters; the sums detached. All in fp32
        (float64 with a float64 head).
    """
    inputs = (hidden_PH, head.weight, head.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _FusedLoss.apply(*inputs, true_P, targets_P, config, scale)
    kd_sum_D, ce_sum, weight_sum, _ = _chunked(*inputs, true_P, targets_P, config, scale,
                                               needs=(False, False, False))
    return weighted_loss(kd_sum_D, ce_sum, config, scale, hidden_PH.shape[0]), kd_sum_D, ce_sum, weight_sum


class _FusedLoss(torch.autograd.Function):
    """(hidden_PH, weight_VH, bias_V or None) -> (loss, summed KD terms [D], summed CE, summed importance weights);
    the gradients are computed in forward, backward only scales them."""

    @staticmethod
    def forward(ctx, hidden_PH, weight_VH, bias_V, true_P, targets_P, config, scale):
        needs = tuple(ctx.needs_input_grad[:3])
        kd_sum_D, ce_sum, weight_sum, grads = _chunked(hidden_PH, weight_VH, bias_V, true_P, targets_P, config,
                                                       scale, needs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(kd_sum_D, ce_sum, weight_sum)
        loss = weighted_loss(kd_sum_D, ce_sum, config, scale, hidden_PH.shape[0])
        return loss, kd_sum_D, ce_sum, weight_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce, _grad_weight):
        # The buffers keep their dtype (the hidden states', the parameters'); the product is taken in fp32.
        grads = [None if g is None else (g * grad_loss).to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None, None


def weighted_loss(kd_sum_D: torch.Tensor, ce_sum: torch.Tensor, config: LossConfig, scale: float,
                  positions: int) -> torch.Tensor:
    """The loss from the summed divergences [D] and summed CE over `positions` trained positions (module
    docstring); every loss path combines its sums here."""
    kd_weights, ce_weight = term_weights(config, scale, positions)
    return (kd_sum_D * kd_sum_D.new_tensor(kd_weights)).sum() + ce_weight * ce_sum


def kd_terms(
    z: Logits | LogitReads, logq_C: torch.Tensor, targets_C: dict[str, torch.Tensor], config: LossConfig,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The KD terms of one chunk, each summed over its positions, in `config.kd_weights` order, and the sum of
    rollout_rkl's importance weights (0 without it): what both loss paths compute from the chunk's logits `z` and
    the student's log-probs of the true next tokens `logq_C` [C] (a function of `z`)."""
    sums = {}
    if config.divergence_weights:
        logp_CJ, logq_CJ = TARGETS_FROM[config.targets](z, targets_C, config.temperature)
        sums = {name: DIVERGENCES[name](logp_CJ, logq_CJ, config.parameter(name)).sum()
                for name in config.divergence_weights}
    weight_sum = logq_C.new_zeros(())
    if ROLLOUT in config.kd_weights:
        surrogate_C, weight_C = rollout_rkl(logq_C, targets_C, config.rollout_clip)
        sums[ROLLOUT], weight_sum = surrogate_C.sum(), weight_C.sum()
    return [sums[name] for name in config.kd_weights], weight_sum


def _chunked(
    hidden_PH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, true_P: torch.Tensor,
    targets_P: dict[str, torch.Tensor], config: LossConfig, scale: float, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Summed KD terms [D], CE and rollout_rkl importance weights over all P positions, a chunk at a time, and the
    gradients `needs` asks for (of the hidden states, weight, bias; None where not asked) of the loss."""
    positions, size = hidden_PH.shape[0], config.chunk_positions
    kd_weights, ce_weight = term_weights(config, scale, positions)
    need_h, need_w, need_b = needs
    grad_PH = torch.zeros_like(hidden_PH) if need_h else None
    grad_VH = torch.zeros_like(weight_VH) if need_w else None
    grad_V = torch.zeros_like(bias_V) if need_b else None
    compute_weight_VH = None  # the weight in the logits' compute dtype, for the backward products
    kd_sum_D = ce_sum = weight_sum = 0.0
    # With no trained position, one empty chunk still runs: sums of 0 and gradients of 0.
    for start in range(0, max(positions, 1), size):
        rows = slice(start, start + size)
        hidden_CH = hidden_PH[rows]
        logits_CV = F.linear(hidden_CH, weight_VH, bias_V)  # as head(h): under autocast, in its dtype
        compute_dtype = logits_CV.dtype
        logits_CV = logits_CV.to(torch.promote_types(compute_dtype, torch.float32))
        targets_C = {key: value[rows] for key, value in targets_P.items()}
        probe = Probe(logits_CV.shape[0], logits_CV)
        if config.divergence_weights:
            TARGETS_FROM[config.targets](probe, targets_C, config.temperature)
        reads = LogitReads(logits_CV, track=any(needs), outside=probe.outside)
        kd_D, ce, weights, objective = _chunk_sums(reads, true_P[rows], targets_C, config, kd_weights, ce_weight)
        kd_sum_D, ce_sum, weight_sum = kd_sum_D + kd_D, ce_sum + ce, weight_sum + weights
        if not any(needs):
            continue
        if objective is None:  # every weight is 0 at this step: the gradient is 0
            logits_CV.zero_()
        else:
            leaf_grads = torch.autograd.grad(objective, [read.leaf for read in reads.reads], allow_unused=True)
            logits_grad_(logits_CV, reads.reads, leaf_grads)
        grad_CV = logits_CV  # overwritten with dL/dz
        with torch.autocast(hidden_PH.device.type, enabled=False):  # the products in the head's compute dtype
            compute_grad_CV = grad_CV.to(compute_dtype)
            if need_h:
                if compute_weight_VH is None:
                    compute_weight_VH = weight_VH.to(compute_dtype)
                grad_PH[rows] = compute_grad_CV @ compute_weight_VH
            if need_w:  # accumulated in the parameter's dtype, as autograd accumulates a chunk's gradient
                if grad_VH.dtype == compute_dtype:
                    grad_VH.addmm_(compute_grad_CV.mT, hidden_CH.to(compute_dtype))
                else:
                    grad_VH.add_(compute_grad_CV.mT @ hidden_CH.to(compute_dtype))
            if need_b:
                grad_V.add_(grad_CV.sum(0))
    return kd_sum_D, ce_sum, weight_sum, (grad_PH, grad_VH, grad_V)


def _chunk_sums(
    reads: LogitReads, true_C: torch.Tensor, targets_C: dict[str, torch.Tensor], config: LossConfig,
    kd_weights: list[float], ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed KD terms [D], summed CE, summed importance weights), detached, and the chunk's weighted sum over the
    leaves (None when every weight is 0), with autograd on the small leaves only."""
    with torch.enable_grad():
        ce_C = (reads.lse() - reads.gather(true_C[:, None])).squeeze(-1)
        ce = ce_C.sum()
        kd, weight_sum = kd_terms(reads, -ce_C, targets_C, config)
        terms = [weight * value for weight, value in zip([*kd_weights, ce_weight], [*kd, ce], strict=True) if weight]
        objective = sum(terms) if terms and reads.track else None
    kd_D = torch.stack(kd).detach() if kd else ce.new_zeros(0)
    return kd_D, ce.detach(), weight_sum, objective
