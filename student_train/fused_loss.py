"""The fused distillation loss: each chunk's logits computed once, their gradient built in the forward pass.

An alternative to the checkpointed chunks of `student_train.losses` (`LossConfig.impl`, "fused" by default for the
store's targets and for CE alone), with the same loss, metrics and gradients. There, each chunk's [C, V] logits are
computed in forward, discarded, computed again in backward, and autograd runs back through the representation's
full-vocabulary reductions. Here they are computed once, because their gradient is simple: a representation reads
the logits z only through `Logits` (`student_train.divergences`), whose three reductions have closed-form
derivatives,

    d lse_T / dz            = softmax(z / T) / T
    d gather_T(ids) / dz    = one-hot(ids) / T
    d outside_lse_T / dz    = exp(z / T - outside_lse_T) / T  off the ids, 0 at them

and the loss is linear in the chunk sums, with weights known in forward:

    loss = sum_d c_d * (summed divergence d) + c_ce * (summed CE),  c_d = s(step) T^2 w_d / P,  c_ce = w_ce / P.

Per chunk: logits = head(h) (in the autocast dtype if any, then fp32, as the checkpointed path); the reductions,
without autograd, handed to the representation as small leaf tensors ([C, 1] or [C, J], `_Reads`); the
representation, the divergences and CE on those leaves, and `torch.autograd.grad` of the chunk's weighted sum with
respect to them (a graph of [C, J] tensors only); then dL/dz assembled in place in the logits' own buffer (the
softmaxes, the outside terms, a scatter-add of the gathered ids' gradients), and pulled back through the head:
dh = dz W, dW += dz^T h, db += sum dz. One chunk's [C, V] exists at a time; with two or more exp terms (e.g.
topk_tail: the log-normaliser and the tail bucket) they are summed a quarter of the rows at a time, so the
temporaries stay under half a buffer.

`_FusedLoss`, a `torch.autograd.Function` over (hidden states, head weight, head bias), runs that loop and keeps
dh [P, H], dW [V, H] and db [V] until backward, which scales them by the incoming gradient. The head's parameters
are inputs of the Function, so autograd accumulates their gradients as for `head(h)`: a weight tied to the input
embedding gets both, and DDP's and FSDP2's gradient hooks see them as usual. The graph holds the gradient buffers
(the size of the head's own gradient, and of the hidden states), not logits; they are freed by backward (or kept
for another one with retain_graph). The divergence sums the Function also returns are detached: metrics only.

Not covered here: online targets (the teacher's logits are dense; `losses` keeps them on the checkpointed path),
and heads other than a plain linear layer (the Function reads `head.weight` and `head.bias`, not `head.forward`).

Legend: P trained positions, C positions in a chunk, H hidden size, V vocabulary, J entries a read covers, D
divergences in the mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from student_train.divergences import DIVERGENCES, TARGETS_FROM

if TYPE_CHECKING:
    from student_train.losses import LossConfig

# With two or more exp terms in a chunk's gradient, each is computed over this share of the rows at a time.
ROW_BLOCKS = 4


@dataclass(frozen=True)
class _Read:
    """One answer a representation got from `_Reads`: its leaf and what it was asked."""

    kind: str  # "lse", "gather" or "outside_lse"
    leaf: torch.Tensor  # [C, 1] or [C, J]
    temperature: float
    ids_CJ: torch.Tensor | None = None
    valid_CJ: torch.Tensor | None = None


class _Probe:
    """What a representation will ask of `Logits`, found by running it on answers of zeros: the ids of its
    outside_lse reads (they come from the targets, never from the logits' values)."""

    def __init__(self, rows: int, like: torch.Tensor):
        self._zeros_C1 = like.new_zeros(rows, 1)
        self.outside: list[tuple[float, torch.Tensor, torch.Tensor | None]] = []  # (T, ids, valid) in call order

    def lse(self, temperature: float = 1.0) -> torch.Tensor:
        return self._zeros_C1

    def gather(self, ids_CJ: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self._zeros_C1.new_zeros(ids_CJ.shape)

    def outside_lse(self, ids_CJ: torch.Tensor, temperature: float = 1.0,
                    valid_CJ: torch.Tensor | None = None) -> torch.Tensor:
        self.outside.append((temperature, ids_CJ, valid_CJ))
        return self._zeros_C1

    def full(self, temperature: float = 1.0) -> torch.Tensor:
        raise AssertionError("a dense read of the logits (online targets) has no fused form; losses keeps online "
                             "targets on the checkpointed path")


class _Reads:
    """A chunk's logits as `Logits` shows them to a representation, each answer computed without autograd and
    returned as a small leaf tensor; with `track`, the leaves require gradients and are recorded in `reads`.

    The values are those of `Logits`, computed with fewer passes over the vocabulary:
    - outside_lse: the excluded ids are set to the most negative float by a scatter into the logits themselves (at
      T = 1; into z / T otherwise), restored afterwards, instead of through a [C, V] mask and a masked copy.
    - lse(T), when the representation also reads an outside_lse at T (`outside`, from `_Probe`): computed from the
      first of them as log(exp(outside_lse) + sum over the excluded ids of exp(z / T)), a sum of positive terms over
      a few ids (each id once), so that one pass over the vocabulary gives both. That outside_lse value is kept for
      its own call.
    """

    def __init__(self, logits_CV: torch.Tensor, track: bool,
                 outside: list[tuple[float, torch.Tensor, torch.Tensor | None]] = ()):
        self.logits_CV = logits_CV
        self.track = track
        self.reads: list[_Read] = []
        self._lse: dict[float, torch.Tensor] = {}
        self._planned = {}  # T -> (index of the outside_lse call, its ids and valid), the first at each T
        for index, (temperature, ids_CJ, valid_CJ) in enumerate(outside):
            self._planned.setdefault(temperature, (index, ids_CJ, valid_CJ))
        self._outside_values: dict[int, torch.Tensor] = {}  # outside_lse values computed early, by call index
        self._outside_calls = 0

    def _leaf(self, read: _Read) -> torch.Tensor:
        if self.track:
            read.leaf.requires_grad_(True)
            self.reads.append(read)
        return read.leaf

    def _scaled(self, temperature: float) -> torch.Tensor:
        return self.logits_CV if temperature == 1.0 else self.logits_CV / temperature

    def lse(self, temperature: float = 1.0) -> torch.Tensor:
        if temperature not in self._lse:
            if temperature in self._planned:
                index, ids_CJ, valid_CJ = self._planned[temperature]
                outside_C1 = self._outside_values[index] = self._outside_lse(ids_CJ, temperature, valid_CJ)
                value_C1 = torch.logaddexp(outside_C1, self._excluded_lse(ids_CJ, temperature, valid_CJ))
            else:
                value_C1 = _logsumexp(self._scaled(temperature))
            self._lse[temperature] = self._leaf(_Read("lse", value_C1, temperature))
        return self._lse[temperature]

    def gather(self, ids_CJ: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        value_CJ = self.logits_CV.gather(-1, ids_CJ)
        return self._leaf(_Read("gather", value_CJ if temperature == 1.0 else value_CJ / temperature, temperature,
                                ids_CJ))

    def outside_lse(self, ids_CJ: torch.Tensor, temperature: float = 1.0,
                    valid_CJ: torch.Tensor | None = None) -> torch.Tensor:
        index, self._outside_calls = self._outside_calls, self._outside_calls + 1
        value_C1 = self._outside_values.pop(index, None)
        if value_C1 is None:
            value_C1 = self._outside_lse(ids_CJ, temperature, valid_CJ)
        return self._leaf(_Read("outside_lse", value_C1, temperature, ids_CJ, valid_CJ))

    def full(self, temperature: float = 1.0) -> torch.Tensor:
        raise AssertionError("a dense read of the logits (online targets) has no fused form; losses keeps online "
                             "targets on the checkpointed path")

    def _outside_lse(self, ids_CJ: torch.Tensor, temperature: float, valid_CJ: torch.Tensor | None) -> torch.Tensor:
        tiny = torch.finfo(self.logits_CV.dtype).min
        scaled_CV = self._scaled(temperature)
        kept_CJ = scaled_CV.gather(-1, ids_CJ) if temperature == 1.0 else None
        scaled_CV.scatter_reduce_(-1, ids_CJ, _exclusion(ids_CJ, valid_CJ, tiny, scaled_CV.dtype), "amin")
        value_C1 = _logsumexp(scaled_CV)
        if kept_CJ is not None:  # the logits back as they were (entries of one id all kept the same value)
            scaled_CV.scatter_(-1, ids_CJ, kept_CJ)
        return value_C1

    def _excluded_lse(self, ids_CJ: torch.Tensor, temperature: float, valid_CJ: torch.Tensor | None) -> torch.Tensor:
        """log sum exp(z / T) over the distinct ids among the valid entries, [C, 1] (-inf for none)."""
        key_CJ = ids_CJ if valid_CJ is None else ids_CJ.masked_fill(~valid_CJ, -1)
        key_CJ = key_CJ.sort(-1).values
        distinct_CJ = key_CJ >= 0
        distinct_CJ[:, 1:] &= key_CJ[:, 1:] != key_CJ[:, :-1]
        scaled_CJ = self.logits_CV.gather(-1, key_CJ.clamp_min(0))
        if temperature != 1.0:
            scaled_CJ = scaled_CJ / temperature
        return scaled_CJ.masked_fill(~distinct_CJ, -math.inf).logsumexp(-1, keepdim=True)


def _logsumexp(x_CV: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last axis, [C, 1]: torch.logsumexp's operations (for finite x), one temporary fewer."""
    max_C1 = x_CV.amax(-1, keepdim=True)
    return (x_CV - max_C1).exp_().sum(-1, keepdim=True).log_().add_(max_C1)


def _exclusion(ids_CJ: torch.Tensor, valid_CJ: torch.Tensor | None, value: float, dtype: torch.dtype) -> torch.Tensor:
    """What an "amin" scatter of `ids_CJ` writes: `value` at the valid entries, +inf (no change) at padding."""
    fill_CJ = torch.full(ids_CJ.shape, value, dtype=dtype, device=ids_CJ.device)
    return fill_CJ if valid_CJ is None else fill_CJ.masked_fill_(~valid_CJ, math.inf)


def term_weights(config: LossConfig, scale: float, positions: int) -> tuple[list[float], float]:
    """(c_d for each divergence of `config.kd_weights`, c_ce): the loss's derivatives with respect to the summed
    divergences and the summed CE (module docstring)."""
    per_position = 1 / max(positions, 1)
    kd = [scale * config.temperature**2 * weight * per_position for weight in config.kd_weights.values()]
    return kd, config.weights.get("ce", 0.0) * per_position  # losses.CE


def fused_loss(
    hidden_PH: torch.Tensor, true_P: torch.Tensor, targets_P: dict[str, torch.Tensor], head: nn.Linear,
    config: LossConfig, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of `losses.distillation_loss` over P trained positions, and its sums, by the fused path.

    Args:
        hidden_PH: the student's final hidden states at the trained positions.
        true_P: the true next tokens.
        targets_P: the records the representation reads, [P, ...] each (none without a divergence).
        head: the student's output layer (a plain linear layer: its weight and bias are read).
        config: the `LossConfig`; its targets must not be online.
        scale: the KD schedule's factor at this step.

    Returns:
        (loss, summed divergences [D], summed CE): the scalar loss, differentiable with respect to `hidden_PH` and
        the head's parameters; the sums detached, in fp32.
    """
    inputs = (hidden_PH, head.weight, head.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _FusedLoss.apply(*inputs, true_P, targets_P, config, scale)
    kd_sum_D, ce_sum, _ = _chunked(*inputs, true_P, targets_P, config, scale, needs=(False, False, False))
    return _loss(kd_sum_D, ce_sum, config, scale, hidden_PH.shape[0]), kd_sum_D, ce_sum


class _FusedLoss(torch.autograd.Function):
    """(hidden_PH, weight_VH, bias_V or None) -> (loss, summed divergences [D], summed CE); the gradients are
    computed in forward, backward only scales them."""

    @staticmethod
    def forward(ctx, hidden_PH, weight_VH, bias_V, true_P, targets_P, config, scale):
        needs = tuple(ctx.needs_input_grad[:3])
        kd_sum_D, ce_sum, grads = _chunked(hidden_PH, weight_VH, bias_V, true_P, targets_P, config, scale, needs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(kd_sum_D, ce_sum)
        return _loss(kd_sum_D, ce_sum, config, scale, hidden_PH.shape[0]), kd_sum_D, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # The buffers keep their dtype (the hidden states', the parameters'); the product is taken in fp32.
        grads = [None if g is None else (g * grad_loss).to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None, None


def _loss(kd_sum_D: torch.Tensor, ce_sum: torch.Tensor, config: LossConfig, scale: float,
          positions: int) -> torch.Tensor:
    kd_weights, ce_weight = term_weights(config, scale, positions)
    return (kd_sum_D * kd_sum_D.new_tensor(kd_weights)).sum() + ce_weight * ce_sum


def _chunked(
    hidden_PH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, true_P: torch.Tensor,
    targets_P: dict[str, torch.Tensor], config: LossConfig, scale: float, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Summed divergences [D] and CE over all P positions, a chunk at a time, and the gradients `needs` asks for
    (of the hidden states, weight, bias; None where not asked) of the loss."""
    positions, size = hidden_PH.shape[0], config.chunk_positions
    kd_weights, ce_weight = term_weights(config, scale, positions)
    need_h, need_w, need_b = needs
    grad_PH = torch.zeros_like(hidden_PH) if need_h else None
    grad_VH = torch.zeros_like(weight_VH) if need_w else None
    grad_V = torch.zeros_like(bias_V) if need_b else None
    compute_weight_VH = None  # the weight in the logits' compute dtype, for the backward products
    kd_sum_D = ce_sum = 0.0
    # With no trained position, one empty chunk still runs: sums of 0 and gradients of 0.
    for start in range(0, max(positions, 1), size):
        rows = slice(start, start + size)
        hidden_CH = hidden_PH[rows]
        logits_CV = F.linear(hidden_CH, weight_VH, bias_V)  # as head(h): under autocast, in its dtype
        compute_dtype = logits_CV.dtype
        logits_CV = logits_CV.to(torch.promote_types(compute_dtype, torch.float32))
        targets_C = {key: value[rows] for key, value in targets_P.items()}
        probe = _Probe(logits_CV.shape[0], logits_CV)
        if config.kd_weights:
            TARGETS_FROM[config.targets](probe, targets_C, config.temperature)
        reads = _Reads(logits_CV, track=any(needs), outside=probe.outside)
        kd_D, ce, objective = _chunk_sums(reads, true_P[rows], targets_C, config, kd_weights, ce_weight)
        kd_sum_D, ce_sum = kd_sum_D + kd_D, ce_sum + ce
        if not any(needs):
            continue
        if objective is None:  # every weight is 0 at this step: the gradient is 0
            logits_CV.zero_()
        else:
            leaf_grads = torch.autograd.grad(objective, [read.leaf for read in reads.reads], allow_unused=True)
            _logits_grad_(logits_CV, reads.reads, leaf_grads)
        grad_CV = logits_CV
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
    return kd_sum_D, ce_sum, (grad_PH, grad_VH, grad_V)


def _chunk_sums(
    reads: _Reads, true_C: torch.Tensor, targets_C: dict[str, torch.Tensor], config: LossConfig,
    kd_weights: list[float], ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed divergences [D], summed CE), detached, and the chunk's weighted sum over the leaves (None when every
    weight is 0), with autograd on the small leaves only."""
    with torch.enable_grad():
        ce = (reads.lse() - reads.gather(true_C[:, None])).sum()
        kd = []
        if config.kd_weights:
            logp_CJ, logq_CJ = TARGETS_FROM[config.targets](reads, targets_C, config.temperature)
            kd = [DIVERGENCES[name](logp_CJ, logq_CJ, config.parameter(name)).sum() for name in config.kd_weights]
        terms = [weight * value for weight, value in zip([*kd_weights, ce_weight], [*kd, ce], strict=True) if weight]
        objective = sum(terms) if terms and reads.track else None
    kd_D = torch.stack(kd).detach() if kd else ce.new_zeros(0)
    return kd_D, ce.detach(), objective


def _logits_grad_(logits_CV: torch.Tensor, reads: list[_Read], leaf_grads: tuple[torch.Tensor | None, ...]) -> None:
    """Overwrite the logits z with dL/dz, from the gradients of the leaves the representation read.

    The exp terms (lse and outside_lse reads) of one temperature share one exp over the vocabulary (`_exp_terms_`);
    a second temperature (CE's T = 1 beside the divergences' T) is computed into a temporary, ROW_BLOCKS of the rows
    at a time. The gathered ids' gradients are scatter-added last.
    """
    by_temperature: dict[float, list[tuple[_Read, torch.Tensor]]] = {}
    scatters = []
    for read, grad in zip(reads, leaf_grads, strict=True):
        if grad is not None:  # None: a read the weighted terms do not depend on (e.g. CE's at weight 0)
            terms = scatters if read.kind == "gather" else by_temperature.setdefault(read.temperature, [])
            terms.append((read, grad / read.temperature))
    groups = list(by_temperature.items())
    rows_C = logits_CV.shape[0]
    block = -(-rows_C // (ROW_BLOCKS if len(groups) > 1 else 1)) or 1
    for start in range(0, rows_C, block):
        rows = slice(start, start + block)
        z_RV = logits_CV[rows]
        # Every group but the first reads z, so it is computed before z is overwritten.
        exact = [_excluded_ids_grad(z_RV, temperature, terms, rows) for temperature, terms in groups]
        others_RV = None
        for (temperature, terms), exact_ids in zip(groups[1:], exact[1:], strict=True):
            scaled_RV = z_RV / temperature if temperature != 1.0 else z_RV.clone()
            term_RV = _exp_terms_(scaled_RV, terms, exact_ids, rows)
            others_RV = term_RV if others_RV is None else others_RV.add_(term_RV)
        if groups:
            temperature, terms = groups[0]
            _exp_terms_(z_RV.div_(temperature) if temperature != 1.0 else z_RV, terms, exact[0], rows)
        else:
            z_RV.zero_()
        if others_RV is not None:
            z_RV.add_(others_RV)
    for read, coef_CJ in scatters:
        logits_CV.scatter_add_(-1, read.ids_CJ, coef_CJ)


def _exp_terms_(
    scaled_RV: torch.Tensor, terms: list[tuple[_Read, torch.Tensor]],
    exact: tuple[torch.Tensor, torch.Tensor] | None, rows: slice,
) -> torch.Tensor:
    """sum over the terms of coef_t * exp(y - value_t) [excluded by none of t's ids], in place on y = z / T over
    some rows.

    On an id no term excludes, each exp(y - value_t) = exp(y - m) * exp(m - value_t) with m the smallest value: one
    exp over the vocabulary, times a coefficient per row. exp(y - m) <= 1 there (m is the log-sum-exp of a set
    holding the id), and exp(m - value_t) <= 1, so nothing overflows; a factor that underflows is one whose term is
    below the smallest float anyway. The ids some term excludes (where exp(y - m) may overflow) are then written
    with their exact values, `exact` (from `_excluded_ids_grad`).
    """
    values_TR1 = torch.stack([read.leaf.detach()[rows] for read, _ in terms])
    shift_R1 = values_TR1.amin(0)
    coef_R1 = sum(coef_C1[rows] * (shift_R1 - value_R1).exp()
                  for (_, coef_C1), value_R1 in zip(terms, values_TR1, strict=True))
    scaled_RV.sub_(shift_R1).exp_().mul_(coef_R1)
    if exact is not None:
        scaled_RV.scatter_(-1, *exact)
    return scaled_RV


def _excluded_ids_grad(
    z_RV: torch.Tensor, temperature: float, terms: list[tuple[_Read, torch.Tensor]], rows: slice,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids [R, U], their dL/dz over the terms [R, U]) for every id an outside_lse term of the group names (U of
    them, padding included), computed term by term; None when no term excludes ids. Entries of one id get equal
    values, so a scatter of them is deterministic."""
    outside = [read for read, _ in terms if read.kind == "outside_lse"]
    if not outside:
        return None
    ids_RU = torch.cat([read.ids_CJ[rows] for read in outside], -1)
    scaled_RU = z_RV.gather(-1, ids_RU)
    if temperature != 1.0:
        scaled_RU = scaled_RU / temperature
    grad_RU = torch.zeros_like(scaled_RU)
    for read, coef_C1 in terms:
        term_RU = coef_C1[rows] * (scaled_RU - read.leaf.detach()[rows]).exp()
        if read.kind == "outside_lse":  # 0 at the ids this read excludes (where exp may have overflowed)
            valid_RJ = None if read.valid_CJ is None else read.valid_CJ[rows]
            term_RU = torch.where(_among(ids_RU, read.ids_CJ[rows], valid_RJ), 0.0, term_RU)
        grad_RU += term_RU
    return ids_RU, grad_RU


def _among(ids_RU: torch.Tensor, ids_RJ: torch.Tensor, valid_RJ: torch.Tensor | None) -> torch.Tensor:
    """[R, U] bool: whether each id of `ids_RU` is among the valid entries of `ids_RJ` in its row."""
    same_RUJ = ids_RU[:, :, None] == ids_RJ[:, None, :]
    if valid_RJ is not None:
        same_RUJ &= valid_RJ[:, None, :]
    return same_RUJ.any(-1)
