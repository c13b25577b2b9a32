"""The quality benchmark's report (`benchmarks/quality.py`): each seed's rows from its runs and evaluations, the
mean and spread over the seeds, the issue's targets, and the table and figures.

Flow: `seed_rows` (one seed: held-out metrics, the share of that seed's CE -> online gap, times relative to that
seed's CE run, curves) -> `aggregate` (per row: the mean over the seeds and half their range, every seed's values
kept under `per_seed`) -> `verdicts` (on the means) -> `markdown`, `chart`, `bytes_chart`.
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from benchmarks.quality_rows import (
    BYTES_TARGET,
    CACHED_TIME_TARGET,
    CE_ROW,
    FULL_ROW,
    GAP_TARGETS,
    RowSpec,
    systematic,
)

# The figures of a row that every seed measures, aggregated over the seeds (mean and half the range).
AGGREGATED = ("lm_loss", "perplexity", "ece", "kl_to_teacher", "top1_agreement", "gap_share", "kl_gap_share", "wall_s",
              "wall_vs_ce", "train_tokens_per_s", "tokens_per_s_vs_ce")
PER_RUN = ("seed", "output")  # run options that differ between the seeds of a row


def curves(run_dir: Path) -> dict[str, list]:
    """From a run's metrics.jsonl: held-out LM loss by step (eval records) and training CE by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"heldout": [[r["eval"]["step"], r["eval"]["lm_loss"]] for r in records if "eval" in r],
            "train_ce": [[r["step"], r["ce"]] for r in records if "eval" not in r],
            "tokens_per_s": [r["tokens_per_s"] for r in records if "eval" not in r]}


def seed_rows(rows: list[RowSpec], runs: dict[str, dict], metrics: dict[str, dict],
              run_dirs: dict[str, Path]) -> tuple[list[dict], float]:
    """One seed's rows (metrics, gap shares, times relative to this seed's CE run, curves) and its CE -> online gap,
    from each row's RUN_RECORD (`runs`), held-out metrics and run directory, all of this seed.

    Two gap shares: of the held-out LM loss (`gap_share`, the targets'), and of KL(teacher || student) on the same
    held-out tokens (`kl_gap_share`), which measures how much of what online KD transfers a row transfers even where
    the budget is too short for online KD to beat CE on LM loss (a pruned student far from its teacher)."""
    ce_metrics, online_metrics = metrics[CE_ROW], metrics[FULL_ROW]

    def share(m: dict, key: str) -> float | None:
        """(CE's - the row's) / (CE's - online's) of a figure; None where online KD does not beat CE on it."""
        gap = ce_metrics[key] - online_metrics[key]
        return (ce_metrics[key] - m[key]) / gap if gap > 0 else None

    out = []
    for row in rows:
        m, curve, run = metrics[row.name], curves(run_dirs[row.name]), runs[row.name]
        out.append({
            "name": row.name, "seed": run["options"]["seed"], "options": run["options"],
            **{key: m[key] for key in ("lm_loss", "perplexity", "ece", "kl_to_teacher", "top1_agreement", "tokens")},
            "gap_share": share(m, "lm_loss"), "kl_gap_share": share(m, "kl_to_teacher"),
            "wall_s": run["wall_s"], "resumed": run["resumed"], "load_average_1min": run["load_average_1min"],
            "train_tokens_per_s": statistics.median(curve.pop("tokens_per_s")), "curves": curve,
        })
    ce = next(row for row in out if row["name"] == CE_ROW)
    for row in out:
        row["wall_vs_ce"] = row["wall_s"] / ce["wall_s"]
        row["tokens_per_s_vs_ce"] = row["train_tokens_per_s"] / ce["train_tokens_per_s"]
    return out, ce_metrics["lm_loss"] - online_metrics["lm_loss"]


def mean_and_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, half the range) of one figure over the seeds; (None, None) when a seed has none (a gap share where
    online KD did not beat CE)."""
    if any(value is None for value in values):
        return None, None
    return statistics.fmean(values), (max(values) - min(values)) / 2


def aggregate(rows: list[RowSpec], per_seed: dict[int, list[dict]], row_bytes: dict[str, float | None]) -> list[dict]:
    """Each row over the seeds: AGGREGATED figures as their mean (the row's own key) and half their range
    (`spread`), the held-out curves averaged step by step, and every seed's row under `per_seed`."""
    out = []
    for index, row in enumerate(rows):
        seeds = [entries[index] for entries in per_seed.values()]
        assert all(entry["name"] == row.name for entry in seeds)
        aggregated = {key: mean_and_spread([entry[key] for entry in seeds]) for key in AGGREGATED}
        out.append({
            "name": row.name, "label": row.label, "target_bytes_per_token": row_bytes[row.name],
            "options": {key: value for key, value in seeds[0]["options"].items() if key not in PER_RUN},
            "tokens": seeds[0]["tokens"], "resumed": any(entry["resumed"] for entry in seeds),
            **{key: mean for key, (mean, _) in aggregated.items()},
            "spread": {key: spread for key, (_, spread) in aggregated.items()},
            "curves": {key: _mean_curve([entry["curves"][key] for entry in seeds]) for key in ("heldout", "train_ce")},
            "per_seed": seeds,
        })
    return out


def _mean_curve(curves_: list[list]) -> list[list]:
    """[step, mean over the seeds that logged that step], by step."""
    by_step: dict[int, list[float]] = {}
    for curve in curves_:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [[step, statistics.fmean(values)] for step, values in sorted(by_step.items())]


def verdicts(rows: list[dict], gaps: dict[str, float]) -> list[dict]:
    """The issue's targets, each on the means over the seeds (`per_seed`: the value of each seed)."""
    by_name = {row["name"]: row for row in rows}

    def verdict(target: str, row: dict, key: str, met: bool) -> dict:
        return {"target": target, "value": row[key], "per_seed": [entry[key] for entry in row["per_seed"]],
                "met": met}

    out = []
    for name, share in GAP_TARGETS.items():
        if name in by_name:
            row = by_name[name]
            out.append(verdict(f"{row['label']} closes >= {share:.0%} of the CE -> online gap", row, "gap_share",
                               row["gap_share"] is not None and row["gap_share"] >= share))
            out.append(verdict(f"{row['label']} closes >= {share:.0%} of the CE -> online gap in KL(teacher ‖ "
                               "student)", row, "kl_gap_share",
                               row["kl_gap_share"] is not None and row["kl_gap_share"] >= share))
    others = [row for row in rows if row["name"] != CE_ROW]
    worst = max(others, key=lambda row: row["ece"])
    ce_ece = by_name[CE_ROW]["ece"]
    out.append(verdict(f"no row's ECE worse than CE's {ce_ece:.4f} (worst: {worst['label']})", worst, "ece",
                       worst["ece"] <= ce_ece))
    cached = [row for row in others if row["name"] != FULL_ROW]
    if cached:
        slowest = max(cached, key=lambda row: row["wall_vs_ce"])
        out.append(verdict(f"cached-KD run time <= {CACHED_TIME_TARGET}x CE's (slowest: {slowest['label']})",
                           slowest, "wall_vs_ce", slowest["wall_vs_ce"] <= CACHED_TIME_TARGET))
    max_bytes, share = BYTES_TARGET
    small = [row for row in cached if row["target_bytes_per_token"] <= max_bytes and row["gap_share"] is not None]
    if small:
        best = max(small, key=lambda row: row["gap_share"])
        out.append(verdict(f"some row at <= {max_bytes:g} B/token closes >= {share:.0%} of the gap (best: "
                           f"{best['label']}, {best['target_bytes_per_token']:.1f} B/token)", best, "gap_share",
                           best["gap_share"] >= share))
    if any(gap <= 0 for gap in gaps.values()):
        out.append({"target": "online KD beats CE on held-out LM loss in every seed (else no gap to share)",
                    "value": min(gaps.values()), "per_seed": list(gaps.values()), "met": False})
    return out


def _cell(row: dict, key: str, form: str, unit: str = "", scale: float = 1.0) -> str:
    """`mean ± half range` of a figure, in `form` and `unit` ("n/a" without one)."""
    if row[key] is None:
        return "n/a"
    return f"{scale * row[key]:{form}} ± {scale * row['spread'][key]:{form}}{unit}"


def markdown(report: dict) -> str:
    s, m, t = report["setup"], report["machine"], report["teacher"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_before"])
    seeds = ", ".join(map(str, s["seeds"]))
    gaps = ", ".join(f"{gap:.4f}" for gap in report["gaps"].values())
    student = (f"student-init of the teacher's layers {', '.join(map(str, s['student_init']))}" if s["student_init"]
               else f"student {s['student_config']}")
    lines = [
        "## Quality of the target kinds",
        "",
        f"Machine: {m['host']}, {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), GPU "
        f"{m['gpu'] or 'none'}, device {m['device']}; torch {m['torch']}; load average at start {load}.",
        f"Teacher {s['teacher']}; {student}; {s['steps']} steps x {s['batch_size']} samples x {s['seq_len']} "
        f"positions = {s['tokens_per_run']:,} tokens per run ({s['epochs']:.2f} epochs of {s['train_store_samples']} "
        f"samples), lr {s['lr']}, seeds {seeds} (each row trained once per seed); KD rows: forward_kl={s['alpha']}, "
        f"ce={1 - s['alpha']:.3g}.",
        f"Held-out: {s['heldout_samples']} samples of {s['heldout_data']}, {s['heldout_tokens']:,} tokens; teacher "
        f"LM loss {t['lm_loss']:.4f}, ECE {t['ece']:.4f}. CE -> online gap: {report['gap']:.4f} nats/token (by seed: "
        f"{gaps}).",
        "",
        f"Each figure: the mean over the seeds {seeds} ± half their range (with two seeds, the two runs gave mean - "
        "spread and mean + spread). Share of the gap: each seed's (loss_ce - loss_row) / (loss_ce - loss_online) "
        "against that seed's CE and online runs, then averaged; the share of the gap in KL likewise, with "
        "KL(teacher ‖ student) for the loss; times relative to CE likewise, per seed.",
        "",
        "| row | target bytes/token | held-out LM loss | ECE | KL(teacher ‖ student) | top-1 agreement | "
        "share of CE -> online gap | share of the gap in KL | wall time (s) | vs CE | train tokens/s | vs CE | "
        "load before/after |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        nbytes = r["target_bytes_per_token"]
        load = "; ".join("/".join(f"{x:.1f}" for x in entry["load_average_1min"]) for entry in r["per_seed"])
        lines.append(
            f"| {r['label']} | {'-' if nbytes is None else f'{nbytes:.1f}'} | {_cell(r, 'lm_loss', '.4f')} | "
            f"{_cell(r, 'ece', '.4f')} | {_cell(r, 'kl_to_teacher', '.4f')} | {_cell(r, 'top1_agreement', '.3f')} | "
            f"{_cell(r, 'gap_share', '.1f', '%', 100)} | {_cell(r, 'kl_gap_share', '.1f', '%', 100)} | "
            f"{_cell(r, 'wall_s', '.1f')}"
            f"{' (resumed)' if r['resumed'] else ''} | {_cell(r, 'wall_vs_ce', '.2f', 'x')} | "
            f"{_cell(r, 'train_tokens_per_s', ',.0f')} | {_cell(r, 'tokens_per_s_vs_ce', '.2f', 'x')} | {load} |")
    lines += ["", "| target | mean | by seed | met |", "|:---|---:|---:|:---|"]
    for v in report["verdicts"]:
        value = "n/a" if v["value"] is None else f"{v['value']:.3g}"
        by_seed = ", ".join("n/a" if x is None else f"{x:.3g}" for x in v["per_seed"])
        lines.append(f"| {v['target']} | {value} | {by_seed} | {'yes' if v['met'] else 'NO'} |")
    lines += ["", "Target bytes/token: the stored bytes per trained token of the records the row trains on (rows that "
              "keep fewer of the stored top-k ids are charged what a store of that k holds).",
              "Wall time: the whole training call (loading, steps, the periodic held-out evaluations every row "
              "shares). Train tokens/s: the median over the run's logged steps. Load: the machine's 1-minute load "
              "average when each seed's run started and ended; times compare only at similar loads."]
    return "\n".join(lines) + "\n"


def chart(report: dict) -> bytes:
    """PNG: held-out LM loss and training CE by step (means over the seeds), one line per row; the teacher's
    held-out loss for reference."""
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    heldout, training = figure.subplots(1, 2)
    for row in report["rows"]:
        for axis, key, marker in ((heldout, "heldout", "o"), (training, "train_ce", None)):
            points = row["curves"][key]
            if points:
                axis.plot(*zip(*points, strict=True), marker=marker, markersize=3, label=row["label"])
    heldout.axhline(report["teacher"]["lm_loss"], color="black", linestyle="--", linewidth=0.8, label="teacher")
    heldout.set(xlabel="optimizer step", ylabel="LM loss (nats/token)", title="Held-out LM loss (mean over seeds)")
    training.set(xlabel="optimizer step", ylabel="CE on the training batch (nats/token)",
                 title="Training CE (mean over seeds)")
    for axis in (heldout, training):
        axis.legend(fontsize=8)
    return _png(figure)


def bytes_chart(report: dict) -> bytes:
    """PNG: each cached row's share of the CE -> online gap (mean over the seeds, bars: half their range) against
    the bytes per token of its targets."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axis = figure.subplots()
    points = sorted((row for row in report["rows"] if row["target_bytes_per_token"] and row["gap_share"] is not None),
                    key=lambda row: row["target_bytes_per_token"])
    for index, row in enumerate(points):
        marker = "^" if systematic(row["name"]) else "s" if row["name"].startswith("hybrid") else "o"
        axis.errorbar(row["target_bytes_per_token"], 100 * row["gap_share"], yerr=100 * row["spread"]["gap_share"],
                      marker=marker, capsize=2, linestyle="none")
        # Labels alternate above and below their points, so that neighbours on the curve stay readable.
        axis.annotate(row["label"], (row["target_bytes_per_token"], 100 * row["gap_share"]), fontsize=7,
                      xytext=(5, 6 if index % 2 else -11), textcoords="offset points")
    hybrids = [row for row in points if row["name"].startswith("hybrid") and not systematic(row["name"])]
    if len(hybrids) > 1:
        axis.plot([r["target_bytes_per_token"] for r in hybrids], [100 * r["gap_share"] for r in hybrids],
                  linestyle="--", linewidth=0.8, color="grey")
    axis.axhline(100, color="black", linewidth=0.8, linestyle=":", label="online full KD")
    axis.axhline(0, color="red", linewidth=0.8, linestyle=":", label="CE only")
    axis.set_xscale("log")
    axis.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000)
                     if points[0]["target_bytes_per_token"] / 2 <= t <= 2 * points[-1]["target_bytes_per_token"]]
                    if points else [])
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set(xlabel="stored target bytes per token (log scale)", ylabel="share of the CE -> online gap (%)",
             title="Bytes vs quality of the target kinds (mean over seeds)")
    axis.legend(fontsize=8)
    return _png(figure)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
