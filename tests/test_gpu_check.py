"""benchmarks/gpu_check.sh on this CPU machine: its CPU mode runs the parts end to end and its JSON holds every part
with an rc; a part over its time limit is stopped and recorded while the others still run; a check meant for CUDA
stops after setup where torch sees no GPU; wrong options exit 2 and say why. The report's reading of each part's
files (pytest's JUnit XML, the torchrun runs' metrics, the probe) is checked on hand-made files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PARTS = ["setup", "cuda_tests", "capture", "train_step", "quality", "distributed"]
# The tests that need CUDA, which the CPU mode runs to check the plumbing: here they skip.
CUDA_TESTS = {"test_integrity_training::test_checkpoint_restores_the_cuda_generator",
              "test_liger::test_auto_on_cuda_with_liger_uses_it"}

gpu_check = load_benchmark("gpu_check")


def _run(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    # Setup's limit is meant for an idle GPU machine; here it waits as long as a loaded CPU needs.
    environ = os.environ | {"PYTHON": sys.executable, "TMPDIR": str(tmp_path), "GPU_CHECK_LIMIT_setup": "900"}
    environ |= env or {}
    environ.pop("OUT", None)
    result = subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], env=environ, capture_output=True,
                            text=True)
    return result, out


@pytest.mark.slow
def test_cpu_mode_runs_the_parts_and_records_a_part_out_of_time(tmp_path):
    """Three parts run (setup always does), the quality part with a 1-second limit: it is stopped (rc 124) and the
    others still give their figures; the parts not asked for are in the JSON as not run."""
    limit_s = 1
    result, out = _run(tmp_path, "--cpu", "--parts", "cuda_tests,capture,quality",
                       env={"GPU_CHECK_LIMIT_quality": str(limit_s)})
    assert result.returncode == 1, result.stdout + result.stderr  # a part ran out of time
    report = json.loads((out / "gpu_check.json").read_text())

    parts = report["parts"]
    assert list(parts) == PARTS
    assert all("rc" in part for part in parts.values())
    assert {name: (part["rc"], part["status"]) for name, part in parts.items()} == {
        "setup": (0, "ok"), "cuda_tests": (0, "ok"), "capture": (0, "ok"), "quality": (124, "timeout"),
        "train_step": (None, "not run"), "distributed": (None, "not run")}
    assert parts["quality"]["limit_s"] == limit_s  # the environment's limit, not the part's default
    assert limit_s <= parts["quality"]["seconds"] < 15
    for name in ("setup", "cuda_tests", "capture"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0, name
    assert (out / "logs" / "quality.log").exists()  # stopped before it printed anything

    assert (report["device"], report["card"], report["torch"]) == ("cpu", None, torch.__version__)
    assert report["machine"]["cuda_available"] is False and report["machine"]["gpus"] == []
    tests = parts["cuda_tests"]["figures"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (0, 0, len(CUDA_TESTS))
    assert {skip["test"].removeprefix("tests.") for skip in tests["skips"]} == CUDA_TESTS
    assert all("CUDA" in skip["reason"] for skip in tests["skips"])
    # capture: 8 samples of 32 positions, each path in both dtypes, each against the bare forward of its dtype.
    capture = parts["capture"]["figures"]
    assert capture["positions"] == 8 * 32
    rows = {(row["path"], row["dtype"]): row for row in parts["capture"]["summary"]["rows"]}
    assert set(rows) == {(path, dtype) for path in ("bare forward", "transformers compute", "transformers build")
                         for dtype in ("float32", "bfloat16")}
    assert all(rows[("bare forward", dtype)]["ratio"] == 1.0 for dtype in ("float32", "bfloat16"))


def test_a_check_on_cuda_without_cuda_stops_after_setup(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    result, out = _run(tmp_path, "--parts", "capture")
    assert result.returncode == 2
    assert "sees no CUDA device" in result.stderr and "--cpu" in result.stderr and "setup failed" in result.stderr
    assert "Traceback" not in result.stderr
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert (parts["setup"]["rc"], parts["setup"]["status"]) == (2, "failed")
    assert all(parts[name]["status"] == "not run" for name in PARTS[1:])


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--parts", "capture,bogus"], {}, "--parts: unknown part 'bogus'; the parts are setup cuda_tests capture"),
    (["--frobnicate"], {}, "unknown option --frobnicate"),
    ([], {"DEVICE": "tpu"}, "DEVICE=tpu: use cuda (the default) or cpu"),
    ([], {"PYTHON": "/nonexistent/python"}, "no Python at '/nonexistent/python': set PYTHON"),
])
def test_wrong_options_exit_2_and_say_why(tmp_path, args, env, message):
    result, out = _run(tmp_path, *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not (out / "gpu_check.json").exists()  # refused before anything ran


def test_report_reads_each_part_from_hand_made_files(tmp_path):
    """Each status from its rc, the JUnit counts, the torchrun runs' speed, the card; nothing of the parts not run."""
    (tmp_path / "parts.tsv").write_text("setup\t0\t12.5\t40\ncuda_tests\t1\t30.0\t55\ncapture\t124\t110.2\t110\n"
                                        "train_step\t137\t95.0\t95\nquality\t-\t0\t95\n")
    (tmp_path / "capture.json").write_text(json.dumps({"positions": 256}))  # not what capture_throughput.py writes
    (tmp_path / "probe.json").write_text(json.dumps({
        "device": "cuda", "nvidia_smi": [{"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04",
                                          "memory.total": "81559 MiB"}],
        "gpus": ["NVIDIA H100 80GB HBM3"], "versions": {"torch": "2.11.0+cu130", "vllm": None}}))
    (tmp_path / "cuda_tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="AssertionError: loss is NaN"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="tests.test_b" name="test_broken"><error message="fixture failed"/></testcase>'
        "</testsuite></testsuites>")
    folder = tmp_path / "distributed"
    (folder / "ddp").mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"gpus": 2, "ranks": 2, "device": "cuda", "modes": ["ddp", "fsdp"]}))
    steps = [{"step": 1, "loss": 3.0, "tokens_per_s": 10.0}, {"step": 2, "loss": 2.5, "tokens_per_s": 30.0},
             {"eval": {"step": 2, "lm_loss": 2.4}}, {"step": 3, "loss": 2.25, "tokens_per_s": 20.0},
             {"step": 4, "loss": 2.0, "tokens_per_s": 40.0}]
    (folder / "ddp" / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in steps))

    report = gpu_check.build_report(tmp_path)

    assert (report["device"], report["card"], report["driver"], report["torch"], report["vllm"]) == (
        "cuda", "NVIDIA H100 80GB HBM3", "580.159.04", "2.11.0+cu130", None)
    parts = report["parts"]
    assert {name: (part["rc"], part["status"], part["seconds"], part["limit_s"]) for name, part in parts.items()} == {
        "setup": (0, "ok", 12.5, 40), "cuda_tests": (1, "failed", 30.0, 55), "capture": (124, "timeout", 110.2, 110),
        "train_step": (137, "timeout", 95.0, 95), "quality": (None, "not run", 0.0, 95),
        "distributed": (None, "not run", 0.0, 0)}
    assert report["total_seconds"] == pytest.approx(12.5 + 30.0 + 110.2 + 95.0)
    tests = parts["cuda_tests"]["figures"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 2, 1)
    assert [f["test"] for f in tests["failures"]] == ["tests.test_a::test_bad", "tests.test_b::test_broken"]
    assert tests["skips"] == [{"test": "tests.test_b::test_gpu", "reason": "needs a CUDA GPU"}]
    # The first logged step (start-up) is left out of the speed: the median of 30, 20 and 40.
    runs = parts["distributed"]["summary"]["runs"]
    assert runs == {"ddp": {"steps": 4, "last_loss": 2.0, "tokens_per_s": 30.0},
                    "fsdp": {"steps": 0, "last_loss": None, "tokens_per_s": None}}
    # Figures of another shape than the summary reads: kept whole, and the summary says what it missed.
    assert parts["capture"]["figures"] == {"positions": 256}
    assert parts["capture"]["summary"]["error"].startswith("KeyError: 'options'")
    assert parts["train_step"]["figures"] is None and parts["train_step"]["summary"] is None
