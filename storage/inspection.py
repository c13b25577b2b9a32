"""Store inspection (`teacher-cache inspect`): what a store holds, from its manifest and per-sample statistics.

Sits after the build, beside `teacher-cache info`: the counts and stored bytes come from the manifest, the
distributions from the `stats_*` arrays (`storage/stats.py`), never from the targets, so a store of a million
samples is inspected in seconds. A version 1 store has no statistics; they are computed from its targets (every
shard's targets are decoded), and the report says so.

Which weighting each figure uses:
- quantiles (min, p1, ..., max) are over samples, each sample with trained tokens once: the ranking that
  `teacher-cache select --top/--bottom/--band` cuts;
- `mean/sample` is the plain mean of those per-sample values; `mean/token` weighs each sample by its trained
  tokens, which gives the store-wide mean over trained positions (for `top1`: the top-1 agreement);
- the true-token rank distribution counts trained positions (tokens).

The `tokens` row (trained tokens per sample) covers every sample, those without trained tokens included.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.reader import Store
from storage.stats import rank_bin_labels
from storage.targets import describe_targets

QUANTILES = {"min": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99,
             "max": 1.0}

# Per-sample keys: what `select --by` ranks and `inspect` summarises; (description, needs top-k targets).
KEYS = {
    "entropy": ("mean teacher entropy over the sample's trained positions (nats)", False),
    "nll": ("mean -log p(true next token) under the teacher (nats)", False),
    "tail_mass": ("mean probability mass outside the top-k", True),
    "top1": ("share of trained positions whose true token is the teacher's top-1", True),
}
# Shards listed one per line by default up to this many; beyond, a min / median / max summary (--shards lists all).
SHARD_LINES = 10
# The arrays a version 1 store's statistics are computed from (`ShardReader.stats`).
TARGET_ARRAYS = ("input_ids", "loss_mask", "entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass")


def available_keys(targets: dict) -> list[str]:
    """The per-sample keys a store with these targets has (tail_mass and top1 need top-k targets)."""
    return [key for key, (_, needs_topk) in KEYS.items() if "topk" in targets or not needs_topk]


def sample_values(stats: dict[str, np.ndarray], key: str) -> np.ndarray:
    """[S] float64 value of `key` per sample (from `Store.stats()`); NaN for samples without trained tokens."""
    if key == "top1":
        tokens = stats["stats_num_tokens"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tokens > 0, stats["stats_true_rank"][:, 0] / tokens, np.nan)
    return stats[f"stats_{key}"].astype(np.float64)


@dataclass
class Inspection:
    """The result of `inspect_store`.

    Attributes:
        report: every figure, JSON-serialisable (what `--json` prints).
        stats: the per-sample statistics arrays of every sample, in global order (for the histograms).
    """

    report: dict
    stats: dict[str, np.ndarray]


def inspect_store(store: Store) -> Inspection:
    """Counts, bytes per token, per-sample distributions and the true-token rank distribution of `store`."""
    start = time.perf_counter()
    stats = store.stats()
    seconds = time.perf_counter() - start
    manifest = store.manifest
    tokens = stats["stats_num_tokens"].astype(np.int64)
    report = {
        "store": str(store.location),
        "complete": manifest.complete,
        "format_version": manifest.format_version,
        "stats_source": "stored" if store.has_stored_stats else "computed from targets",
        "stats_seconds": seconds,
        "note": None if store.has_stored_stats else _version_1_note(store),
        "samples": manifest.num_samples,
        "samples_without_tokens": int((tokens == 0).sum()),
        "tokens": manifest.num_tokens,
        "positions": manifest.num_positions,
        "shards": len(manifest.shards),
        "targets": describe_targets(manifest.targets),
        "bytes_per_token": store.bytes_per_token(),
        "distributions": {key: _distribution(sample_values(stats, key), tokens)
                          for key in available_keys(manifest.targets)},
        "true_rank": _true_rank(stats, manifest.targets) if "topk" in manifest.targets else None,
        "per_shard": _per_shard(store, stats),
    }
    report["distributions"]["tokens"] = _distribution(tokens.astype(np.float64), None)
    return Inspection(report=report, stats=stats)


def _version_1_note(store: Store) -> str:
    decoded = sum(s.array_bytes.get(name, 0) for s in store.manifest.shards for name in TARGET_ARRAYS)
    return (f"format version 1 store: it has no stats_* arrays, so the statistics were computed from its targets, "
            f"which is slower: decoding {decoded / 2**20:,.1f} MiB of stored targets (every position of every shard), "
            "where a version 2 store has a few bytes per sample to read. Stores built by this release have them.")


def _distribution(values: np.ndarray, tokens: np.ndarray | None) -> dict:
    """Quantiles over the samples with a value, their mean, and (given `tokens`) the token-weighted mean."""
    finite = np.isfinite(values)
    out = {"samples": int(finite.sum()), "quantiles": None, "mean_per_sample": None, "mean_per_token": None}
    if not finite.any():
        return out
    kept = values[finite]
    out["quantiles"] = dict(zip(QUANTILES, np.quantile(kept, list(QUANTILES.values())).tolist(), strict=True))
    out["mean_per_sample"] = float(kept.mean())
    if tokens is not None:
        out["mean_per_token"] = float((kept * tokens[finite]).sum() / tokens[finite].sum())
    return out


def _true_rank(stats: dict[str, np.ndarray], targets: dict) -> dict:
    k = targets["topk"]["k"]
    counts = stats["stats_true_rank"].sum(axis=0, dtype=np.int64)
    total = int(counts.sum())
    shares = counts / total if total else np.full(len(counts), np.nan)
    return {
        "k": k,
        "tokens": total,
        "bins": [{"rank": label, "tokens": int(c), "share": _float(s)}
                 for label, c, s in zip(rank_bin_labels(k), counts, shares, strict=True)],
        "top1_agreement": _float(shares[0]),
        "in_topk": _float(1.0 - shares[-1]),
    }


def _per_shard(store: Store, stats: dict[str, np.ndarray]) -> list[dict]:
    """Counts, stored bytes per token and token-weighted means of each shard."""
    infos = store.manifest.shards
    starts = np.cumsum([0] + [s.num_samples for s in infos])
    tokens = stats["stats_num_tokens"].astype(np.float64)
    sums = {key: _segment_sums(np.where(tokens > 0, sample_values(stats, key) * tokens, 0.0), starts)
            for key in available_keys(store.manifest.targets)}
    rows = []
    for j, info in enumerate(infos):
        per_token = max(info.num_tokens, 1)
        rows.append({
            "name": info.name, "samples": info.num_samples, "tokens": info.num_tokens,
            "positions": info.num_positions,
            "bytes_per_token": sum(info.array_bytes.values()) / per_token,
            "array_bytes_per_token": {name: b / per_token for name, b in info.array_bytes.items()},
            "mean_per_token": {key: float(s[j] / info.num_tokens) if info.num_tokens else None
                               for key, s in sums.items()},
        })
    return rows


def _segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum of `values[starts[j]:starts[j+1]]` for every j (empty segments give 0)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


def _float(value) -> float | None:
    return float(value) if np.isfinite(value) else None


# --- human-readable report ----------------------------------------------------------------------------------------


def format_report(report: dict, *, all_shards: bool = False) -> str:
    """The report as text tables; shards one per line when there are at most SHARD_LINES or `all_shards`."""
    lines = [
        f"store      {report['store']}  (format {report['format_version']}"
        f"{'' if report['complete'] else ', INCOMPLETE: committed shards only'})",
        f"samples    {report['samples']:,} in {report['shards']:,} shards; {report['tokens']:,} trained tokens of "
        f"{report['positions']:,} positions; {report['samples_without_tokens']:,} samples without trained tokens",
        f"targets    {report['targets']}",
        f"statistics {_source(report)} in {report['stats_seconds']:.2f} s",
    ]
    if report["note"]:
        lines += ["", f"note: {report['note']}"]
    lines += ["", *_bytes_table(report), "", *_distribution_table(report)]
    if report["true_rank"]:
        lines += ["", *_rank_table(report["true_rank"])]
    lines += ["", *_shard_lines(report, all_shards)]
    return "\n".join(lines)


def _source(report: dict) -> str:
    if report["stats_source"] == "stored":
        return "read from the stats_* arrays"
    return "computed from the targets (format version 1, see the note)"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def _bytes_table(report: dict) -> list[str]:
    lines = ["bytes/token (stored bytes per trained token)"]
    lines += [f"  {name:<22}{value:10.2f}" for name, value in report["bytes_per_token"].items()]
    return lines


def _distribution_table(report: dict) -> list[str]:
    columns = [*QUANTILES, "mean/sample", "mean/token"]
    lines = ["per-sample distributions: quantiles over samples; mean/token weighs samples by their trained tokens",
             f"  {'':<10}{'samples':>10}" + "".join(f"{c:>12}" for c in columns)]
    for key, dist in report["distributions"].items():
        quantiles = dist["quantiles"] or dict.fromkeys(QUANTILES)
        values = [*quantiles.values(), dist["mean_per_sample"], dist["mean_per_token"]]
        lines.append(f"  {key:<10}{dist['samples']:>10,}" + "".join(f"{_num(v):>12}" for v in values))
    lines += [f"  {key:<10}{description}" for key, (description, _) in KEYS.items() if key in report["distributions"]]
    lines.append(f"  {'tokens':<10}trained tokens per sample (every sample)")
    return lines


def _rank_table(rank: dict) -> list[str]:
    width = max(7, *(len(b["rank"]) + 2 for b in rank["bins"]))
    shares = [_num(None) if b["share"] is None else f"{100 * b['share']:.1f}%" for b in rank["bins"]]
    pct = {name: "-" if rank[name] is None else f"{100 * rank[name]:.1f}%" for name in ("top1_agreement", "in_topk")}
    return [
        f"true-token rank among the teacher's top-{rank['k']} (share of {rank['tokens']:,} trained tokens)",
        "  rank   " + "".join(f"{b['rank']:>{width}}" for b in rank["bins"]),
        "  share  " + "".join(f"{s:>{width}}" for s in shares),
        f"  top-1 agreement {pct['top1_agreement']}, in the top-{rank['k']} {pct['in_topk']}",
    ]


def _shard_columns(report: dict) -> dict[str, list]:
    rows = report["per_shard"]
    columns = {"samples": [r["samples"] for r in rows], "tokens": [r["tokens"] for r in rows],
               "positions": [r["positions"] for r in rows], "bytes/token": [r["bytes_per_token"] for r in rows]}
    for key in report["distributions"]:
        if key != "tokens":
            columns[key] = [r["mean_per_token"][key] for r in rows]
    return columns


def _shard_lines(report: dict, all_shards: bool) -> list[str]:
    rows, columns = report["per_shard"], _shard_columns(report)
    if not rows:
        return ["per shard: no shards"]
    if all_shards or len(rows) <= SHARD_LINES:
        lines = ["per shard (entropy, nll, ...: means over the shard's trained tokens)",
                 f"  {'shard':<22}" + "".join(f"{name:>13}" for name in columns)]
        for j, row in enumerate(rows):
            lines.append(f"  {row['name']:<22}" + "".join(f"{_num(values[j]):>13}" for values in columns.values()))
        return lines
    lines = [f"per shard: {len(rows):,} shards, summarised (--shards lists each; #: the first shard with the "
             "extreme; means over each shard's trained tokens)", f"  {'':<13}{'min':>24}{'median':>13}{'max':>24}"]
    for name, values in columns.items():
        known = [(v, j) for j, v in enumerate(values) if v is not None]
        if not known:
            continue
        low, high = min(known), max(known, key=lambda pair: (pair[0], -pair[1]))
        median = float(np.median([v for v, _ in known]))
        lines.append(f"  {name:<13}{_num(low[0]) + f' (#{low[1]})':>24}{_num(median):>13}"
                     f"{_num(high[0]) + f' (#{high[1]})':>24}")
    return lines


# --- histograms ---------------------------------------------------------------------------------------------------


def plot_report(inspection: Inspection, path: str | os.PathLike) -> None:
    """One PNG with a panel per distribution (histograms over samples) and the rank distribution (bars)."""
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    report, stats = inspection.report, inspection.stats
    panels = [key for key in report["distributions"] if key != "tokens"] + ["tokens"]
    if report["true_rank"]:
        panels.insert(len(panels) - 1, "rank")
    columns = 3
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "rank":
            bins = report["true_rank"]["bins"]
            ax.bar([b["rank"] for b in bins], [100 * (b["share"] or 0.0) for b in bins], color="tab:green")
            ax.set(xlabel="rank of the true token (last bar: outside the top-k)", ylabel="% of trained tokens",
                   title=f"True-token rank among the top-{report['true_rank']['k']}")
            continue
        values = stats["stats_num_tokens"].astype(np.float64) if panel == "tokens" else sample_values(stats, panel)
        values = values[np.isfinite(values)]
        ax.hist(values, bins=50, color="tab:blue")
        dist = report["distributions"][panel]
        if dist["quantiles"]:
            median = dist["quantiles"]["p50"]
            ax.axvline(median, color="black", linewidth=0.8, label=f"median {_num(median)}")
            ax.legend(loc="upper right", fontsize=8)
        description = KEYS[panel][0] if panel in KEYS else "trained tokens per sample"
        ax.set(xlabel=description, ylabel="samples", title=f"{panel} ({dist['samples']:,} samples)")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    figure.suptitle(f"{report['store']}: {report['samples']:,} samples, {report['tokens']:,} trained tokens")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
