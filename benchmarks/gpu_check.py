"""The steps of `gpu_check.sh` that need Python: what the machine is, the models every part shares, the report.

`gpu_check.sh` runs each part of the GPU check as its own process under its own time limit; this module gives it
  - probe: the card(s), driver, CUDA and library versions as JSON; exits 2 when a GPU check finds no CUDA device;
  - models: the random teacher (head sharpened, as in train_step.py) and the config-only student the quality and
    distributed parts train, and the training and held-out halves of the local text, in one folder;
  - report: one JSON from every part's exit status, seconds and figures (the benchmarks' own JSON, pytest's
    JUnit XML, the metrics of the torchrun runs), each part's headline numbers under "summary".
The report reads files only (no torch), so it is written even when a part broke the Python environment.

    python benchmarks/gpu_check.py probe --device cuda --json WORK/probe.json
    python benchmarks/gpu_check.py models --size gpu --work WORK/models
    python benchmarks/gpu_check.py report --work WORK --json OUT/gpu_check.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORT_VERSION = 1
PARTS = ("setup", "cuda_tests", "capture", "train_step", "quality", "distributed")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIBRARIES = ("torch", "transformers", "vllm", "liger-kernel", "triton", "zarr", "datasets")
# The shared random teacher and student of each size: "gpu" for a check on a GPU, "cpu" for the plumbing check.
SIZES = {
    "gpu": {"teacher_hidden": 512, "teacher_layers": 8, "student_hidden": 256, "student_layers": 4},
    "cpu": {"teacher_hidden": 64, "teacher_layers": 2, "student_hidden": 64, "student_layers": 1},
}
MAX_POSITIONS = 1024
HELDOUT_SHARE = 0.1  # the last tenth of the text's lines is the held-out text


@click.group()
def main() -> None:
    """Probe the machine, build the shared models, or assemble the report of a GPU check."""


@main.command()
@click.option("--device", type=click.Choice(["cuda", "cpu"]), required=True, help="What the check runs on.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True)
def probe(device: str, json_path: str) -> None:
    """Write what the machine is; exit 2 if a check on CUDA finds no CUDA device."""
    import torch

    info = {"device": device, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "nvidia_smi": nvidia_smi(), "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "versions": {name: _version(name) for name in LIBRARIES}}
    Path(json_path).write_text(json.dumps(info, indent=1))
    click.echo(json.dumps(info, indent=1))
    if device == "cuda" and not info["cuda_available"]:
        click.echo(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                   f"(nvidia-smi: {info['nvidia_smi'] or 'not found'}). Run on a machine whose torch has CUDA, or "
                   "pass --cpu to check the plumbing on the CPU.", err=True)
        sys.exit(2)


def nvidia_smi() -> list[dict] | None:
    """Name, driver and memory of each GPU as nvidia-smi reports them; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name", "driver_version", "memory.total")
    out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return [{"error": (out.stderr or out.stdout).strip()}]
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=True))
            for line in out.stdout.splitlines() if line.strip()]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@main.command()
@click.option("--size", type=click.Choice(list(SIZES)), required=True)
@click.option("--work", type=click.Path(file_okay=False), required=True, help="Folder to write them to.")
@click.option("--text", default=str(DATA / "tinyshakespeare.txt"), show_default=True, help="Text to split.")
def models(size: str, work: str, text: str) -> None:
    """A random teacher, a student config with its tokenizer, and train.txt / heldout.txt, in WORK."""
    from transformers import AutoTokenizer

    from benchmarks.train_step import llama_config, random_teacher

    shape, folder = SIZES[size], Path(work)
    folder.mkdir(parents=True, exist_ok=True)
    random_teacher(folder / "teacher", 32000, shape["teacher_hidden"], shape["teacher_layers"], MAX_POSITIONS)
    llama_config(32000, shape["student_hidden"], shape["student_layers"], MAX_POSITIONS).save_pretrained(
        folder / "student")
    AutoTokenizer.from_pretrained(folder / "teacher").save_pretrained(folder / "student")
    lines = Path(text).read_text(encoding="utf-8").splitlines(keepends=True)
    cut = round(len(lines) * (1 - HELDOUT_SHARE))
    (folder / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (folder / "heldout.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    click.echo(f"{folder}: teacher {shape['teacher_hidden']} x {shape['teacher_layers']}, student "
               f"{shape['student_hidden']} x {shape['student_layers']}, {cut} training and {len(lines) - cut} "
               "held-out lines")


@main.command()
@click.option("--work", type=click.Path(file_okay=False, exists=True), required=True,
              help="The check's work folder: parts.tsv, probe.json and each part's files.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True)
def report(work: str, json_path: str) -> None:
    """Assemble the check's JSON: the machine, and every part with its rc, seconds, summary and figures."""
    result = build_report(Path(work))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    for name, part in result["parts"].items():
        click.echo(f"{name:<12} {part['status']:<8} rc {part['rc']!s:<5} {part['seconds']:>6.0f} s "
                   f"(limit {part['limit_s']} s)")


def build_report(work: Path) -> dict:
    """The report of the check whose files are in `work` (see `gpu_check.sh` for their names)."""
    runs = read_parts(work / "parts.tsv")
    probe_path = work / "probe.json"
    machine = json.loads(probe_path.read_text()) if probe_path.exists() else None
    parts = {}
    for name in PARTS:
        run = runs.get(name, {"rc": None, "seconds": 0.0, "limit_s": 0, "status": "not run"})
        figures = FIGURES[name](work)
        parts[name] = run | {"log": f"logs/{name}.log", "summary": summary(name, figures), "figures": figures}
    return {"format": "gpu-check", "format_version": REPORT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **card(machine), "machine": machine,
            "total_seconds": sum(part["seconds"] for part in parts.values()), "parts": parts}


def card(machine: dict | None) -> dict:
    """What the check ran on, in a few words: the device, the first GPU's name and driver, torch and vLLM."""
    if machine is None:  # setup did not get as far as the probe
        return {"device": None, "card": None, "driver": None, "torch": None, "vllm": None}
    smi = (machine["nvidia_smi"] or [{}])[0]
    return {"device": machine["device"], "card": smi.get("name") or next(iter(machine["gpus"]), None),
            "driver": smi.get("driver_version"), "torch": machine["versions"]["torch"],
            "vllm": machine["versions"]["vllm"]}


def summary(name: str, figures: dict | None) -> dict | None:
    """A part's headline figures. A benchmark whose JSON lacks a field named here still leaves the report whole:
    its summary says which field, and its full figures are kept."""
    if figures is None or SUMMARIES[name] is None:
        return None
    try:
        return SUMMARIES[name](figures)
    except (KeyError, TypeError) as error:
        return {"error": f"{type(error).__name__}: {error} (the figures of {name} are not as this report reads them)"}


def read_parts(path: Path) -> dict[str, dict]:
    """Lines NAME RC SECONDS LIMIT, tab-separated, one per part that was started; RC '-' for a part not started."""
    runs = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        code = None if rc == "-" else int(rc)
        status = ("not run" if code is None else "ok" if code == 0 else "timeout" if code in (124, 137)
                  else "failed")
        runs[name] = {"rc": code, "status": status, "seconds": float(seconds), "limit_s": int(limit)}
    return runs


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def junit(path: Path) -> dict | None:
    """Counts of a pytest JUnit XML file, and the ids of the tests that failed or were skipped (with why)."""
    if not path.exists():
        return None
    counts, failed, skipped = {"passed": 0, "failed": 0, "skipped": 0}, [], []
    for case in ElementTree.parse(path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skipped.append({"test": test, "reason": outcome.get("message")})
        else:
            counts["failed"] += 1
            failed.append({"test": test, "message": (outcome.get("message") or "")[:500]})
    return counts | {"failures": failed, "skips": skipped}


def distributed_figures(work: Path) -> dict | None:
    """Each torchrun mode's training metrics (steps, last loss, median tokens/s after the first logged step), or
    the JUnit counts of tests/test_distributed.py where the machine had one GPU."""
    folder = work / "distributed"
    plan = _json(folder / "plan.json")
    if plan is None:
        return None
    modes = {}
    for mode in plan.get("modes", []):
        metrics = folder / mode / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        steps = [r for r in records if "eval" not in r]
        speeds = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
        modes[mode] = {"steps": len(steps), "last_loss": steps[-1]["loss"] if steps else None,
                       "tokens_per_s": statistics.median(speeds) if speeds else None}
    return plan | {"runs": modes, "tests": junit(folder / "tests.xml")}


FIGURES = {
    "setup": lambda work: None,  # what setup finds is the report's "machine"
    "cuda_tests": lambda work: junit(work / "cuda_tests.xml"),
    "capture": lambda work: _json(work / "capture.json"),
    "train_step": lambda work: _json(work / "train_step.json"),
    "quality": lambda work: _json(work / "quality" / "quality.json"),
    "distributed": distributed_figures,
}


def _pick(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{key: row.get(key) for key in keys} for row in rows]


SUMMARIES = {
    "setup": None,
    "cuda_tests": lambda f: {key: f[key] for key in ("passed", "failed", "skipped")},
    "capture": lambda f: {"model": f["options"]["model"], "rows": _pick(f["rows"], ("path", "dtype", "tokens_per_s",
                                                                                   "ratio")),
                          "bfloat16_vs_float32": f["bfloat16_vs_float32"], "vllm": f["machine"]["vllm"],
                          "vllm_engine_start_s": f["vllm_engine_start_s"]},
    "train_step": lambda f: {"rows": _pick(f["rows"], ("variant", "loss_impl", "ms_per_step", "ms_per_step_vs_ce",
                                                       "peak_mib", "peak_mib_vs_ce", "online_time_vs_this")),
                             "targets": f["targets"]},
    "quality": lambda f: {"gap": f["gap"], "rows": _pick(f["rows"], ("name", "lm_loss", "kl_to_teacher",
                                                                     "gap_share", "wall_vs_ce")),
                          "verdicts": f["verdicts"]},
    "distributed": lambda f: {"ranks": f["ranks"], "device": f["device"], "runs": f["runs"],
                              "tests": {key: f["tests"][key] for key in ("passed", "failed", "skipped")}
                              if f["tests"] else None},
}


if __name__ == "__main__":
    main()
