"""The reads a representation makes of one chunk's logits, answered with small leaf tensors, and the [C, V] gradient
of the logits assembled from those leaves' gradients: the two halves of `student_train.fused_loss`.

A representation reads the student's logits z only through `Logits` (`student_train.divergences`): `lse(T)`,
`gather(ids, T)`, `outside_lse(ids, T, valid)`. `LogitReads` answers those calls with the same values, computed
without autograd, each as a leaf ([C, 1] or [C, J]) that may require gradients, and records what was asked. Given
the gradients of the loss with respect to the leaves, `logits_grad_` overwrites the logits with dL/dz:

    d lse_T / dz            = softmax(z / T) / T
    d gather_T(ids) / dz    = one-hot(ids) / T
    d outside_lse_T / dz    = exp(z / T - outside_lse_T) / T  off the ids, 0 at them

Passes over the vocabulary are what a chunk costs beyond its matrix products, so both halves save them:
- lse(T), when the representation also reads an outside_lse at T (as topk_tail and sampled do), comes from that
  outside_lse and a few ids (`Probe` finds the ids before the representation runs), so one log-sum-exp over the
  vocabulary gives both;
- outside_lse masks the excluded ids in place and restores them, with no [C, V] mask or masked copy;
- the logits at a planned outside_lse's ids are gathered once, and serve its restore, that lse, a gather of the same
  ids (on CPU) and the exact gradient at them (each gather from a [C, V] chunk misses the cache at almost every id);
- the exp terms of one temperature share one exp over the vocabulary, written in place over the logits; only a
  second temperature (CE's T = 1 beside the divergences' T) needs a temporary, a share of the rows at a time.

Legend: C positions in a chunk, R rows of a chunk, V vocabulary, J entries a read covers, U ids a group of reads
excludes.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# With two temperatures in a chunk's gradient, the second's terms are computed 1 / ROW_BLOCKS of the rows at a time.
ROW_BLOCKS = 4

# The rows `_logsumexp` takes its exponentials of at a time on CPU, in bytes: a block that stays in a core's L2 cache
# from the subtraction to the sum.
TEMP_BYTES = 1 << 20


@dataclass(frozen=True)
class Read:
    """One answer a representation got from `LogitReads`: its leaf and what it was asked."""

    kind: str  # "lse", "gather" or "outside_lse"
    leaf: torch.Tensor  # [C, 1] or [C, J]
    temperature: float
    ids_CJ: torch.Tensor | None = None
    valid_CJ: torch.Tensor | None = None
    # outside_lse only: the logits z at ids_CJ (unscaled), and whether each entry names an id the read excludes (one
    # of a valid entry: padding entries of such an id too).
    logits_CJ: torch.Tensor | None = None
    excluded_CJ: torch.Tensor | None = None


def _no_dense_read():
    raise AssertionError("a dense read of the logits (online targets) has no fused form; losses keeps online targets "
                         "on the checkpointed path")


class Probe:
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
        _no_dense_read()


class LogitReads:
    """A chunk's logits as `Logits` shows them to a representation, each answer computed without autograd and
    returned as a small leaf tensor; with `track`, the leaves require gradients and are recorded in `reads`.

    The values are those of `Logits`, computed with fewer passes over the vocabulary:
    - outside_lse: the excluded ids are set to markers far below any logit by a scatter into the logits themselves
      (at every T: the log-sum-exp takes (z - max) / T a block at a time), restored afterwards, instead of through a
      [C, V] mask and a masked copy.
    - lse(T), when the representation also reads an outside_lse at T (`outside`, from `Probe`): computed from the
      first of them as log(exp(outside_lse) + sum over the excluded ids of exp(z / T)), a sum of positive terms over
      a few ids (each id once), so that one pass over the vocabulary gives both. That outside_lse value is kept for
      its own call, with the logits at its ids, which also answer a gather of equal ids (on CPU).
    """

    def __init__(self, logits_CV: torch.Tensor, track: bool,
                 outside: list[tuple[float, torch.Tensor, torch.Tensor | None]] = ()):
        self.logits_CV = logits_CV
        self.track = track
        self.reads: list[Read] = []
        self._lse: dict[float, torch.Tensor] = {}
        self._outside = outside
        self._planned = {}  # T -> (index of the outside_lse call, its ids and valid), the first at each T
        for index, (temperature, ids_CJ, valid_CJ) in enumerate(outside):
            self._planned.setdefault(temperature, (index, ids_CJ, valid_CJ))
        self._outside_values: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # computed early, by
        # call index: (outside_lse value, z at its ids, its entries naming an excluded id)
        self._known: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, z at them) gathered for those reads
        self._outside_calls = 0

    def _leaf(self, read: Read) -> torch.Tensor:
        if self.track:
            read.leaf.requires_grad_(True)
            self.reads.append(read)
        return read.leaf

    def lse(self, temperature: float = 1.0) -> torch.Tensor:
        if temperature not in self._lse:
            if temperature in self._planned:
                index, ids_CJ, valid_CJ = self._planned[temperature]
                logits_CJ = self.logits_CV.gather(-1, ids_CJ)
                self._known.append((ids_CJ, logits_CJ))
                outside_C1, excluded_CJ, first_CJ = self._outside_lse(ids_CJ, temperature, valid_CJ, logits_CJ)
                self._outside_values[index] = outside_C1, logits_CJ, excluded_CJ
                # Each excluded id once: at the first valid entry that names it.
                scaled_CJ = _scale(logits_CJ, temperature).masked_fill(~first_CJ, -math.inf)
                value_C1 = torch.logaddexp(outside_C1, scaled_CJ.logsumexp(-1, keepdim=True))
            else:
                value_C1 = _logsumexp(self.logits_CV, temperature=temperature)
            self._lse[temperature] = self._leaf(Read("lse", value_C1, temperature))
        return self._lse[temperature]

    def gather(self, ids_CJ: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        # Compared on CPU only: on a GPU the comparison would wait for the device at every chunk, and a gather there
        # costs little.
        known_CJ = next((logits_CJ for ids, logits_CJ in self._known if ids.shape == ids_CJ.shape
                         and ids.device.type == "cpu" and torch.equal(ids, ids_CJ)), None)
        if known_CJ is not None:  # the ids an outside_lse read excludes: already gathered, the leaf a copy
            value_CJ = known_CJ.clone() if temperature == 1.0 else known_CJ / temperature
        else:
            value_CJ = _scale(self.logits_CV.gather(-1, ids_CJ), temperature)
        return self._leaf(Read("gather", value_CJ, temperature, ids_CJ))

    def outside_lse(self, ids_CJ: torch.Tensor, temperature: float = 1.0,
                    valid_CJ: torch.Tensor | None = None) -> torch.Tensor:
        index, self._outside_calls = self._outside_calls, self._outside_calls + 1
        early = self._outside_values.pop(index, None)
        if early is not None:
            assert self._outside[index][1].shape == ids_CJ.shape, "the probe saw other reads than the representation"
            value_C1, logits_CJ, excluded_CJ = early
        else:
            logits_CJ = self.logits_CV.gather(-1, ids_CJ)
            value_C1, excluded_CJ, _ = self._outside_lse(ids_CJ, temperature, valid_CJ, logits_CJ)
        return self._leaf(Read("outside_lse", value_C1, temperature, ids_CJ, valid_CJ, logits_CJ, excluded_CJ))

    def full(self, temperature: float = 1.0) -> torch.Tensor:
        _no_dense_read()

    def _outside_lse(
        self, ids_CJ: torch.Tensor, temperature: float, valid_CJ: torch.Tensor | None, logits_CJ: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log sum exp(z / T) over the ids no valid entry of `ids_CJ` names, [C, 1]; which entries name an excluded id,
        and which are the first valid entry of their id, [C, J] each. `logits_CJ` is z at `ids_CJ`.

        Each valid entry j writes its own marker m_j (`_markers`: distinct, far below any logit, rising with j) with an
        "amin" scatter, so an excluded id ends up holding the marker of its first valid entry; gathered back, the
        markers tell both which entries name an excluded id and which entry is each id's first. The log-sum-exp over
        the vocabulary then sees the markers as nothing beside its max.
        """
        z_CV = self.logits_CV
        finfo = torch.finfo(z_CV.dtype)
        markers_CJ = _markers(ids_CJ.shape[-1], z_CV.dtype, z_CV.device).expand(ids_CJ.shape)
        fill_CJ = markers_CJ.clone() if valid_CJ is None else markers_CJ.masked_fill(~valid_CJ, math.inf)
        z_CV.scatter_reduce_(-1, ids_CJ, fill_CJ, "amin")
        found_CJ = z_CV.gather(-1, ids_CJ)
        first_CJ = found_CJ == fill_CJ
        excluded_CJ = found_CJ <= markers_CJ[:, -1:]
        max_C1 = z_CV.amax(-1, keepdim=True)
        # The excluded ids then at a floor below the others' max, instead of at their markers: exp of either is
        # nothing beside the max's exp(0) = 1, but exp of anything below log(tiny) (about -87.3 in fp32, where it
        # underflows) takes a slow path on CPU, 30-100x per vector of 16 that holds one. With nothing outside the
        # ids (the max a marker), the floor rounds back to that marker.
        floor_CJ = _exclusion(valid_CJ, max_C1 + (math.log(finfo.tiny) + 1) * temperature, ids_CJ.shape)
        z_CV.scatter_reduce_(-1, ids_CJ, floor_CJ, "amax")
        value_C1 = _logsumexp(z_CV, max_C1, temperature)
        z_CV.scatter_(-1, ids_CJ, logits_CJ)  # the logits back as they were (entries of one id kept one value)
        return value_C1, excluded_CJ, first_CJ


def _scale(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1.0 else x / temperature


def _markers(entries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[entries] distinct values of `dtype`, rising, within entries ulps of its most negative float (exact: one ulp
    of the largest binade apart), far below any logit."""
    finfo = torch.finfo(dtype)
    assert entries * finfo.eps < 1, "more entries than the largest binade has floats"
    ulp = math.ldexp(finfo.eps, math.frexp(finfo.max)[1] - 1)
    return torch.arange(entries, dtype=dtype, device=device).mul_(ulp).add_(finfo.min)


def _exclusion(valid_CJ: torch.Tensor | None, value_C1: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """What an "amax" scatter writes: `value_C1` of each row at the valid entries, -inf (no change) at the others."""
    fill_CJ = value_C1.expand(shape)
    return fill_CJ.clone() if valid_CJ is None else fill_CJ.masked_fill(~valid_CJ, -math.inf)


def _logsumexp(x_CV: torch.Tensor, max_C1: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log sum exp(x / T) over the last axis, [C, 1] (`max_C1`: the max of x, when known): torch.logsumexp's
    operations (for finite x), on (x - max) / T, with no [C, V] copy of x / T; max / T is kept finite (a row of x
    whose max is the most negative float, at T < 1).

    On CPU the exponentials are taken a block of rows at a time (at most TEMP_BYTES, which stays in cache from the
    subtraction to the sum) in a buffer kept between calls (`_temporary`). A fresh temporary at each call costs about as
    much as the exponentials there, in page faults: glibc maps a block above 32 MiB (a whole 256 x 32k fp32 chunk is
    32.8 MB) anew at every call, and smaller blocks often enough (when other allocations split the freed one). On a
    GPU the caching allocator reuses the temporary, and one kernel per operation beats many small ones.
    """
    if max_C1 is None:
        max_C1 = x_CV.amax(-1, keepdim=True)
    shift_C1 = max_C1 if temperature == 1.0 else (max_C1 / temperature).clamp_min_(torch.finfo(x_CV.dtype).min)
    if x_CV.device.type != "cpu":
        y_CV = x_CV - max_C1
        return (y_CV if temperature == 1.0 else y_CV.div_(temperature)).exp_().sum(-1, keepdim=True).log_().add_(
            shift_C1)
    rows = max(1, TEMP_BYTES // max(x_CV.shape[-1] * x_CV.element_size(), 1))
    sums = []
    for x_RV, max_R1 in zip(x_CV.split(rows), max_C1.split(rows), strict=True):
        y_RV = torch.sub(x_RV, max_R1, out=_temporary("exp", x_RV.shape, x_RV))
        if temperature != 1.0:
            y_RV.div_(temperature)
        sums.append(y_RV.exp_().sum(-1, keepdim=True))
    return torch.cat(sums).log_().add_(shift_C1)


_buffers = threading.local()


def _scratch(name: str, like: torch.Tensor, numel: int) -> torch.Tensor:
    """A flat buffer `name` of at least `numel` elements of `like`'s dtype and device, kept by this thread between
    calls (one per name, dtype and device, grown as needed); its contents are valid until the next call for `name`."""
    kept = _buffers.__dict__.setdefault("by_kind", {})
    key = (name, like.dtype, like.device)
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = kept[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer


def _temporary(name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` like `like`: on CPU a view of the kept buffer `name` (`_scratch`: a fresh
    tensor of a chunk's size would be mapped anew, page faults and all, at every call), elsewhere a new one (a GPU's
    caching allocator reuses the block)."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    return _scratch(name, like, math.prod(shape))[:math.prod(shape)].view(shape)


def logits_grad_(logits_CV: torch.Tensor, reads: list[Read], leaf_grads: tuple[torch.Tensor | None, ...]) -> None:
    """Overwrite the logits z with dL/dz, from the gradients of the leaves the representation read.

    The exp terms (lse and outside_lse reads) of one temperature share one exp over the vocabulary (`_exp_terms_`);
    a second temperature (CE's T = 1 beside the divergences' T) is computed into a temporary, 1 / ROW_BLOCKS of
    the rows at a time. The gathered ids' gradients are scatter-added last.
    """
    by_temperature: dict[float, list[tuple[Read, torch.Tensor]]] = {}
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
        exact = [_excluded_ids_grad(temperature, terms, rows) for temperature, terms in groups]
        # Every group but the first reads z, so it is computed before z is overwritten.
        others_RV = None
        for index, ((temperature, terms), exact_ids) in enumerate(zip(groups[1:], exact[1:], strict=True)):
            scaled_RV = _temporary(f"terms {index}", z_RV.shape, z_RV)
            if temperature != 1.0:
                torch.div(z_RV, temperature, out=scaled_RV)
            else:
                scaled_RV.copy_(z_RV)
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
    scaled_RV: torch.Tensor, terms: list[tuple[Read, torch.Tensor]],
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
    temperature: float, terms: list[tuple[Read, torch.Tensor]], rows: slice,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids [R, U], their dL/dz over the terms [R, U]) for every id an outside_lse term of the group names (U of
    them, padding included), computed term by term from the logits the reads gathered (`Read.logits_CJ`); None when
    no term excludes ids. Entries of one id get equal values, so a scatter of them is deterministic."""
    outside = [read for read, _ in terms if read.kind == "outside_lse"]
    if not outside:
        return None
    ids_RU = torch.cat([read.ids_CJ[rows] for read in outside], -1)
    scaled_RU = _scale(torch.cat([read.logits_CJ[rows] for read in outside], -1), temperature)
    grad_RU = torch.zeros_like(scaled_RU)
    for read, coef_C1 in terms:
        term_RU = coef_C1[rows] * (scaled_RU - read.leaf.detach()[rows]).exp()
        if read.kind == "outside_lse":  # 0 at the ids this read excludes (where exp may have overflowed)
            if len(outside) == 1:  # the entries are the read's own: its pass found which name an excluded id
                among_RU = read.excluded_CJ[rows]
            else:
                among_RU = _among(ids_RU, read.ids_CJ[rows], None if read.valid_CJ is None else read.valid_CJ[rows])
            term_RU = torch.where(among_RU, 0.0, term_RU)
        grad_RU += term_RU
    return ids_RU, grad_RU


def _among(ids_RU: torch.Tensor, ids_RJ: torch.Tensor, valid_RJ: torch.Tensor | None) -> torch.Tensor:
    """[R, U] bool: whether each id of `ids_RU` is among the valid entries of `ids_RJ` in its row.

    A binary search of each id in its row's sorted valid ids: U log J steps a row. Padding entries, and one more
    entry in front (so that a read of no ids still has a row to search), are -1, which no id equals. Comparing every
    pair instead makes an [R, U, J] tensor, which for hybrid targets (U = J = K + M, over a hundred) outweighed the
    chunk's pass over a small vocabulary.
    """
    key_RJ = ids_RJ if valid_RJ is None else ids_RJ.masked_fill(~valid_RJ, -1)
    key_RJ = F.pad(key_RJ, (1, 0), value=-1).sort(-1).values
    at_RU = torch.searchsorted(key_RJ, ids_RU).clamp_max(key_RJ.shape[-1] - 1)
    return key_RJ.gather(-1, at_RU) == ids_RU
