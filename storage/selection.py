"""Sample selection (`teacher-cache select`): training samples chosen by a per-sample statistic, for
`student-train --selection`.

Sits between the build and training: reads the store's per-sample statistics (`storage/stats.py`, through
`Store.stats()`; never the targets of a version 2 store), ranks the candidate samples by one key
(`storage.inspection.KEYS`: entropy, nll, tail_mass, top1), cuts a share of them, orders the cut (a curriculum,
or a shuffle) and writes a selection file: {"sample_ids": [...], plus what was selected and how}, which
`student-train --selection` trains on exactly, in its order.

The rule, deterministic: the candidates are the samples below the held-out tail (the last `held_out_fraction` of
the store, which `student-train` evaluates on by default) with at least `min_tokens` trained tokens (samples
without any have no statistics and are never selected). They are ranked by (value, sample id), ascending, N of
them; `--bottom F` takes the first round(F * N), `--top F` the last round(F * N), `--band LO:HI` the ranks
round(LO * N) .. round(HI * N) - 1. So ties at a cut are broken by sample id, and `--band 0.7:1` is `--top 0.3`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.inspection import KEYS, available_keys, sample_values
from storage.reader import Store

ORDERS = ("shuffle", "ascending", "descending", "store")
SELECTION_FORMAT_VERSION = 1


@dataclass(kw_only=True)
class SelectConfig:
    """Options of `teacher-cache select`.

    Attributes:
        store: the store to select from.
        output: the selection file to write (JSON).
        key: the per-sample statistic ranked: entropy, nll, tail_mass or top1 (see `storage.inspection.KEYS`).
        top: keep the highest this share of the candidates, in (0, 1].
        bottom: keep the lowest this share of the candidates, in (0, 1].
        band: keep the candidates between these two quantiles (low, high), 0 <= low < high <= 1.
        order: order of the selected ids in the file, which is the training order: shuffle (with `seed`),
            ascending or descending by the key (ties by sample id), or store (by sample id).
        seed: seed of the shuffle order.
        min_tokens: candidates have at least this many trained tokens.
        held_out_fraction: the last round(fraction * samples) samples are never selected (the held-out tail
            `student-train --eval-fraction` evaluates on); 0 selects from the whole store (train with --eval-store).
        force: overwrite an existing output.
    """

    store: str
    output: str
    key: str
    top: float | None = None
    bottom: float | None = None
    band: tuple[float, float] | None = None
    order: str = "shuffle"
    seed: int = 0
    min_tokens: int = 1
    held_out_fraction: float = 0.05
    force: bool = False

    def __post_init__(self) -> None:
        if self.key not in KEYS:
            raise ValueError(f"--by: {self.key!r} is not a key; the keys are {', '.join(KEYS)}.")
        rules = [name for name in ("top", "bottom", "band") if getattr(self, name) is not None]
        if len(rules) != 1:
            given = f"got {', '.join('--' + r for r in rules)}" if rules else "got none"
            raise ValueError(f"give exactly one of --top, --bottom and --band ({given}).")
        for name in ("top", "bottom"):
            share = getattr(self, name)
            if share is not None and not 0.0 < share <= 1.0:
                raise ValueError(f"--{name}: a share of the candidates in (0, 1], got {share} (0.3 keeps 30%).")
        if self.band is not None:
            low, high = self.band
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(f"--band: LOW:HIGH quantiles with 0 <= LOW < HIGH <= 1, got {low}:{high} "
                                 "(e.g. 0.5:0.9).")
        if self.order not in ORDERS:
            raise ValueError(f"--order: {self.order!r} is not one of {', '.join(ORDERS)}.")
        if self.min_tokens < 1:
            raise ValueError(f"--min-tokens: must be at least 1, got {self.min_tokens} (samples without trained "
                             "tokens are never selected).")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"--held-out-fraction: must be in [0, 1), got {self.held_out_fraction}.")
        if Path(self.output).exists() and not self.force:
            raise ValueError(f"--output {self.output} already exists; pass --force to overwrite it, or choose "
                             "another path.")

    @property
    def rule(self) -> dict:
        """The cut as written to the selection file: {"top": F}, {"bottom": F} or {"band": [LOW, HIGH]}."""
        if self.band is not None:
            return {"band": list(self.band)}
        return {"top": self.top} if self.top is not None else {"bottom": self.bottom}


def parse_band(text: str) -> tuple[float, float]:
    """'0.5:0.9' -> (0.5, 0.9)."""
    low, _, high = text.partition(":")
    try:
        return float(low), float(high)
    except ValueError:
        pass
    raise ValueError(f"--band: expected LOW:HIGH, two quantiles such as 0.5:0.9, got {text!r}.")


def _cut(count: int, share: float) -> int:
    """round(share * count), halves up, robust to the float error of e.g. 0.3 * 10."""
    return math.floor(share * count + 0.5 + 1e-9)


def select_samples(config: SelectConfig, store: Store | None = None) -> dict:
    """Select samples as `config` says and write the selection file; returns what was written.

    Raises:
        ValueError: the key needs top-k targets the store lacks, or the rule selects no sample.
    """
    store = store or Store(config.store)
    if config.key not in available_keys(store.manifest.targets):
        raise ValueError(f"--by {config.key}: needs top-k targets and {store.location} holds "
                         f"{', '.join(store.manifest.targets) or 'none'}; its keys are "
                         f"{', '.join(available_keys(store.manifest.targets))}.")
    stats = store.stats()
    values = sample_values(stats, config.key)
    num_samples = len(values)
    stop = num_samples - round(num_samples * config.held_out_fraction)
    tokens = stats["stats_num_tokens"].astype(np.int64)
    eligible = (np.arange(num_samples) < stop) & (tokens >= config.min_tokens) & np.isfinite(values)
    candidates = np.flatnonzero(eligible)
    ranked = candidates[np.lexsort((candidates, values[candidates]))]  # by value, then by id
    n = len(ranked)
    low, high = _bounds(config, n)
    chosen = ranked[low:high]
    if len(chosen) == 0:
        raise ValueError(f"{_rule_text(config)} of {n:,} candidate samples selects none (candidates: samples "
                         f"below the held-out tail with at least {config.min_tokens} trained tokens); widen the "
                         "rule or lower --min-tokens / --held-out-fraction.")
    ordered = _order(chosen, values, config)
    selection = _describe(config, store, values, tokens, ordered, stop=stop, candidates=n)
    _write_atomic(Path(config.output), selection)
    return selection


def _bounds(config: SelectConfig, n: int) -> tuple[int, int]:
    """[low, high) of the ranks kept, in the ascending ranking of `n` candidates."""
    if config.bottom is not None:
        return 0, _cut(n, config.bottom)
    if config.top is not None:
        return n - _cut(n, config.top), n
    return _cut(n, config.band[0]), _cut(n, config.band[1])


def _rule_text(config: SelectConfig) -> str:
    if config.band is not None:
        return f"--band {config.band[0]}:{config.band[1]}"
    return f"--top {config.top}" if config.top is not None else f"--bottom {config.bottom}"


def _order(chosen: np.ndarray, values: np.ndarray, config: SelectConfig) -> np.ndarray:
    """The selected ids in training order."""
    if config.order == "shuffle":
        return np.random.default_rng(config.seed).permutation(np.sort(chosen))
    if config.order == "store":
        return np.sort(chosen)
    sign = 1.0 if config.order == "ascending" else -1.0
    return chosen[np.lexsort((chosen, sign * values[chosen]))]  # ties by sample id in both directions


def _describe(config: SelectConfig, store: Store, values: np.ndarray, tokens: np.ndarray, ordered: np.ndarray, *,
              stop: int, candidates: int) -> dict:
    num_samples = len(values)
    kept = values[ordered]
    return {
        "format": "teacher-cache-selection",
        "format_version": SELECTION_FORMAT_VERSION,
        "store": str(store.location),
        "store_format_version": store.manifest.format_version,
        "key": config.key,
        "key_description": KEYS[config.key][0],
        "rule": config.rule,
        "order": config.order,
        "seed": config.seed if config.order == "shuffle" else None,
        "min_tokens": config.min_tokens,
        "held_out_fraction": config.held_out_fraction,
        "counts": {
            "store_samples": num_samples,
            "held_out": num_samples - stop,
            "without_tokens": int((tokens[:stop] == 0).sum()),
            "below_min_tokens": int(((tokens[:stop] > 0) & (tokens[:stop] < config.min_tokens)).sum()),
            "candidates": candidates,
            "selected": len(ordered),
            "selected_tokens": int(tokens[ordered].sum()),
        },
        "key_range": {"min": float(kept.min()), "max": float(kept.max())},
        "sample_ids": ordered.tolist(),
    }


def _write_atomic(path: Path, selection: dict) -> None:
    """JSON with one line per metadata entry and the ids on one line, written under a temporary name first."""
    header = {k: v for k, v in selection.items() if k != "sample_ids"}
    text = json.dumps(header, indent=1)[:-2] + ',\n "sample_ids": ' + json.dumps(selection["sample_ids"]) + "\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary(selection: dict, output: str) -> str:
    """One paragraph for the command line."""
    counts, key_range = selection["counts"], selection["key_range"]
    rule = ", ".join(f"{k} {v[0]}:{v[1]}" if k == "band" else f"{k} {v}" for k, v in selection["rule"].items())
    return (f"Selected {counts['selected']:,} of {counts['candidates']:,} candidate samples ({rule} by "
            f"{selection['key']}, {selection['key']} from {key_range['min']:.5g} to {key_range['max']:.5g}; "
            f"{counts['selected_tokens']:,} trained tokens), order {selection['order']}, to {output}. Not "
            f"candidates: {counts['held_out']:,} held out, {counts['without_tokens']:,} without trained tokens, "
            f"{counts['below_min_tokens']:,} below --min-tokens. Train with: student-train --selection {output} ...")
