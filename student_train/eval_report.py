"""The files of `student-train eval`: report.json (every number), report.md (a table, teacher vs student) and
report.png (student / teacher ratios and the reliability diagram), written atomically into one directory.

The report is the dict `student_train.evaluate.evaluate` returns; this module only presents it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

# (key, label, format) of the table's rows; a ratio is shown for the keys in RATIO_KEYS.
ROWS = (
    ("lm_loss", "LM loss (nats/token)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.4g}"),
    ("kl_to_teacher", "KL(teacher ‖ it) (nats/token)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement with the teacher", "{:.3f}"),
    ("ece", "expected calibration error (15 bins)", "{:.4f}"),
    ("parameters", "parameters", None),
    ("disk_bytes", "weights on disk", None),
    ("ms_per_token", "latency (ms/token)", "{:.4g}"),
    ("tokens_per_s", "throughput (tokens/s)", "{:,.0f}"),
    ("peak_memory_bytes", "peak memory", None),
)
RATIO_KEYS = ("lm_loss", "perplexity", "ece", "parameters", "disk_bytes", "ms_per_token", "tokens_per_s",
              "peak_memory_bytes")
CHART_KEYS = (("lm_loss", "LM loss"), ("ece", "ECE"), ("parameters", "params"), ("disk_bytes", "disk"),
              ("ms_per_token", "ms/token"), ("peak_memory_bytes", "peak mem"))  # lower is better for each


def ratios(teacher: dict, student: dict) -> dict[str, float | None]:
    """student / teacher for each metric where a ratio means something; None where the teacher's value is 0."""
    return {key: student[key] / teacher[key] if teacher[key] else None for key in RATIO_KEYS}


def markdown(report: dict) -> str:
    """A markdown table of the report: teacher, student, and their ratio."""
    teacher, student, ratio = report["teacher"], report["student"], report["ratios"]
    source = report["evaluated_on"]
    if "store" in source:
        first, last = source["first_sample"], source["first_sample"] + source["samples"] - 1
        where = f"samples {first}..{last} of the {source['store_samples']} of the store {source['store']}"
    else:
        where = f"{source['data']} ({source['samples']} rows)"
    lines = [
        "## Teacher vs student",
        "",
        f"Held-out: {where}, {source['tokens']:,} tokens in rows of {source['seq_len']} positions; "
        f"{report['device']}, {report['dtype']}.",
        "",
        "| metric | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
    ]
    for key, label, fmt in ROWS:
        shown = [_format(key, fmt, model[key]) for model in (teacher, student)]
        r = ratio.get(key)
        lines.append(f"| {label} | {shown[0]} | {shown[1]} | {'' if r is None else f'{r:.3g}'} |")
    lines += [
        "",
        f"Teacher: {teacher['path']}. Student: {student['path']}.",
        f"Speed: the scoring forward (all positions, batches of {report['config']['batch_size']}), after a warm-up "
        f"batch. Peak memory: {student['peak_memory']}.",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output: Path) -> None:
    """report.json, report.md and report.png in `output` (created if needed), each replaced atomically."""
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(output / "report.md", markdown(report).encode())
    write_atomic(output / "report.png", _chart(report))


def _format(key: str, fmt: str | None, value) -> str:
    if key == "parameters":
        return f"{value / 1e6:.2f}M"
    if key in ("disk_bytes", "peak_memory_bytes"):
        return f"{value / 2**20:.1f} MiB"
    return fmt.format(value)


def _chart(report: dict) -> bytes:
    """PNG: student / teacher ratios as bars (log scale), and both models' reliability diagrams."""
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    bars, reliability = figure.subplots(1, 2, width_ratios=(1.3, 1))
    shown = [(label, report["ratios"][key]) for key, label in CHART_KEYS if report["ratios"][key]]
    labels, values = zip(*shown, strict=True) if shown else ((), ())
    bars.bar(labels, values, color=["tab:green" if v <= 1 else "tab:red" for v in values])
    bars.axhline(1.0, color="black", linewidth=0.8)
    bars.set_yscale("log")
    bars.set_ylabel("student / teacher")
    bars.set_title("Student relative to teacher (below 1: smaller, lower, faster)")
    bars.tick_params(axis="x", labelrotation=20)
    for x, value in enumerate(values):
        bars.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom" if value >= 1 else "top", fontsize=8)
    reliability.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="calibrated")
    for name, color in (("teacher", "tab:blue"), ("student", "tab:orange")):
        points = [(b["confidence"], b["accuracy"]) for b in report[name]["reliability"] if b["count"]]
        if points:
            reliability.plot(*zip(*points, strict=True), marker="o", color=color,
                             label=f"{name} (ECE {report[name]['ece']:.3f})")
    reliability.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
                    title="Reliability diagram (15 bins)")
    reliability.legend(loc="upper left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
