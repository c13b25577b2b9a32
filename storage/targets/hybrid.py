"""Hybrid targets: the exact top-k record (`storage.targets.topk`) plus N draws from the teacher's distribution
conditioned on the tail, the ids outside the top-k (`teacher-cache build --targets hybrid --top-k K --samples N`).

The manifest records them as a `topk` section and a `sampled` section with `draws_from = "tail"` (format version
3 on); the draws use the sampled arrays (`storage.targets.sampled.draw_arrays`). Positions without a tail get no
entries. A store holds one sampled record, so hybrid and sampled targets never meet in one store.
"""

from __future__ import annotations

import logging

from storage.layout import ArraySpec
from storage.targets.sampled import MULTINOMIAL, Sampled, draw_arrays, draw_scheme, draws_from_tail
from storage.targets.sampled import section as sampled_section

log = logging.getLogger(__name__)

TAIL_SOURCE = "tail: the ids outside the top-k, each at p / tail mass"


def section(num_draws: int, seed: int, draw_scheme: str = MULTINOMIAL, **entries) -> dict:
    """The manifest's `sampled` section of draws from the tail outside the top-k (the `topk` section beside it)."""
    return sampled_section(num_draws, seed, draw_scheme, **entries) | {"source": TAIL_SOURCE, "draws_from": "tail"}


class Hybrid(Sampled):
    """Draws as `Sampled`'s (the same arrays, batch tensors and concat rules), of the tail beside a top-k."""

    name = "hybrid"
    requires = ("topk",)

    def present(self, targets: dict) -> bool:
        return draws_from_tail(targets)

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        return draw_arrays(targets, vocab_size, ", drawn from the tail (ids outside topk_ids)")

    def describe(self, targets: dict) -> str:
        k = targets["topk"]["k"]
        return (f"hybrid: top-{k} + tail mass, {targets['sampled']['num_draws']} draws from the tail outside the "
                f"top-{k} ({draw_scheme(targets['sampled'])})")

    def mixed_note(self) -> str:
        return ("Some of these stores hold hybrid targets (draws from the tail outside the top-k, "
                "targets.sampled.draws_from = 'tail') and others do not: their draws estimate different "
                "distributions and cannot share one sampled record.")

    def ensemble(self, names: list[str], targets: list[dict], *, weights: list[float], top_k: int | None) -> None:
        """Tail draws are never pooled (each member's tail lies outside its own top-k): warns which are dropped."""
        if tail := [name for name, t in zip(names, targets, strict=True) if self.present(t)]:
            log.warning("sampled targets dropped: the draws of %s come from the tail outside that store's own top-k "
                        "(hybrid targets), which differs between stores, so they are no draws of the mixture and "
                        "cannot be pooled; the top-k is kept", ", ".join(tail))


HYBRID = Hybrid()
