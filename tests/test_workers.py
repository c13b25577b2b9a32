"""Builds shared by several workers: the merged store equals a build in one process, shard for shard.

30 documents of Shakespeare pack into 40 samples of 32 positions: 7 shards of 6 samples, the last holding 4.
Worker 0 of 2 owns shards 0, 2, 4, 6 (22 samples), worker 1 shards 1, 3, 5 (18 samples). Two worker processes
run at once through the CLI; interrupted workers resume alone; the merge refuses what is missing, names it,
and runs by hand; workers with other options are refused. The reference is an uninterrupted in-process build,
and the samples are also checked against the tokenizer's own packed stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl, write_manifest
from transformers import AutoTokenizer

from storage import open_store
from storage.samples import Rows
from storage.writer import StoreWriter
from teacher_cache import BuildConfig, build_cache
from teacher_cache.build import iter_batches
from teacher_cache.cli import main
from teacher_cache.config import resolve_workers, worker_device
from teacher_cache.teacher import TransformersTeacher

REPO = Path(__file__).resolve().parents[1]

SEQ_LEN, PER_SHARD, NUM_DOCS = 32, 6, 30
NUM_SAMPLES, NUM_SHARDS = 40, 7
OWNED = {0: [0, 2, 4, 6], 1: [1, 3, 5]}  # shards of worker 0 and worker 1 of 2
OPTIONS = dict(seq_len=SEQ_LEN, batch_size=4, samples_per_shard=PER_SHARD, top_k=8, num_draws=20, seed=7,
               hidden_layers=(-1,), device="cpu", dtype="float32")
CLI_OPTIONS = ["--seq-len", str(SEQ_LEN), "--batch-size", "4", "--samples-per-shard", str(PER_SHARD), "--top-k", "8",
               "--samples", "20", "--seed", "7", "--hidden-layers", "-1", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    return corpus_texts[:NUM_DOCS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("workers-data") / "docs.jsonl", texts)


@pytest.fixture(scope="module")
def teacher(llama_dir) -> TransformersTeacher:
    """Loaded once for the in-process builds of this module."""
    return TransformersTeacher(str(llama_dir), device="cpu", dtype="float32")


def _config(llama_dir, dataset, output, **overrides) -> BuildConfig:
    return BuildConfig(model=str(llama_dir), dataset=str(dataset), output=str(output), **{**OPTIONS, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir, dataset, teacher) -> Path:
    """A build in one process: what every merged store must equal."""
    output = tmp_path_factory.mktemp("workers-reference") / "store"
    build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    return output


@pytest.fixture(scope="module")
def packed_stream(llama_dir, texts) -> np.ndarray:
    """The tokenizer's documents, EOS after each, concatenated (FORMAT.md, packed stores)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    docs = tokenizer(texts, add_special_tokens=True)["input_ids"]
    docs = [d if d[-1] == tokenizer.eos_token_id else [*d, tokenizer.eos_token_id] for d in docs]
    return np.concatenate([np.asarray(d) for d in docs])


def assert_equals_reference(output: Path, reference: Path, packed_stream: np.ndarray) -> None:
    """Merged, complete, intact, and every shard's arrays and files equal the one-process build's."""
    store, ref = open_store(output), open_store(reference)
    assert store.manifest.complete and store.manifest.worker is None
    assert store.manifest.header() == ref.manifest.header()
    assert [asdict(s) for s in store.manifest.shards] == [asdict(s) for s in ref.manifest.shards]
    assert len(store.shards) == NUM_SHARDS and len(store) == NUM_SAMPLES
    for got, want in zip(store.shards, ref.shards, strict=True):
        got, want = got.read(), want.read()
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    # Every sample of the stream once, in order: sample i is the window stream[i*L : i*L + L + 1].
    for i in range(NUM_SAMPLES):
        window = packed_stream[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1]
        assert np.array_equal(store[i]["input_ids"][:len(window)], window), i
    assert sorted(os.listdir(output / "shards")) == [f"shard-{i:06d}" for i in range(NUM_SHARDS)]
    assert not (output / "workers").exists()
    assert store.verify() == []


def _fail_after(monkeypatch, commits: int) -> None:
    """Make the writer fail right after its `commits`-th commit, as a crash between two shards would."""
    original, done = StoreWriter.write_shard, []

    def failing(self, index, record):
        info = original(self, index, record)
        done.append(index)
        if len(done) == commits:
            raise OSError("injected failure after a commit")
        return info

    monkeypatch.setattr(StoreWriter, "write_shard", failing)


def _file_stats(root: Path, shards: list[int]) -> dict[str, tuple[int, int, str]]:
    out = {}
    for index in shards:
        for path in sorted((root / "shards" / f"shard-{index:06d}").rglob("*")):
            if path.is_file():
                st, digest = path.stat(), hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, digest)
    return out


def _worker_manifest(root: Path, index: int, count: int = 2) -> dict:
    return json.loads((root / "workers" / f"worker-{index:05d}-of-{count:05d}.json").read_text())


def _leftover(path: Path) -> Path:
    (path / "input_ids").mkdir(parents=True)
    (path / "zarr.json").write_text('{"garbage": true}')
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- two processes at once ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_worker_processes_at_once_equal_one_process(tmp_path, llama_dir, dataset, reference, packed_stream):
    output = tmp_path / "store"
    base = [sys.executable, "-m", "teacher_cache.cli", "build", "--model", str(llama_dir), "--dataset", str(dataset),
            "--output", str(output), *CLI_OPTIONS]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    commands = [(base + ["--num-workers", "2", "--worker-index", "0"], env),
                (base, env | {"WORLD_SIZE": "2", "RANK": "1"})]  # worker 1 learns its place from torchrun's variables
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    processes = []
    for (command, environ), log_path in zip(commands, logs, strict=True):
        with open(log_path, "wb") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT))
    for process, log_path in zip(processes, logs, strict=True):
        # No timeout: the builds end by themselves, however slow a loaded machine makes them.
        assert process.wait() == 0, log_path.read_text()[-3000:]

    texts = [p.read_text() for p in logs]
    assert "worker 1 of 2, from torchrun (WORLD_SIZE, RANK)" in texts[1]
    assert any(f"Wrote {NUM_SAMPLES} samples" in t for t in texts)  # the one that finished last merged
    assert_equals_reference(output, reference, packed_stream)
    result = _cli("verify", output)
    assert result.exit_code == 0 and "every file matches" in result.output


# --- resume -------------------------------------------------------------------------------------------------------


def test_interrupted_workers_resume_alone(tmp_path, monkeypatch, llama_dir, dataset, teacher, reference,
                                          packed_stream):
    output = tmp_path / "store"
    worker = {i: _config(llama_dir, dataset, output, num_workers=2, worker_index=i) for i in range(2)}
    with monkeypatch.context() as patch:
        _fail_after(patch, 1)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_cache(worker[0], teacher=teacher)
        _fail_after(patch, 2)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_cache(worker[1], teacher=teacher)
    assert [s["name"] for s in _worker_manifest(output, 0)["shards"]] == ["shards/shard-000000"]
    assert [s["name"] for s in _worker_manifest(output, 1)["shards"]] == ["shards/shard-000001", "shards/shard-000003"]
    assert not (output / "manifest.json").exists()
    with pytest.raises(RuntimeError, match=r"build incomplete: workers 0, 1 of 2 have not finished; rerun them "
                                           r"with --resume, or run `teacher-cache merge .*` once they have"):
        open_store(output)

    # Worker 0 was committing shard 2 when it stopped; worker 1 had renamed shard 5 into place, not committed it.
    in_flight = _leftover(output / "shards" / ".tmp-shard-000002-123")
    own = [_leftover(output / "shards" / ".tmp-shard-000005-123"), _leftover(output / "shards" / "shard-000005")]
    with pytest.raises(ValueError, match="Worker 1 of 2 has already started.*--resume"):
        build_cache(worker[1], teacher=teacher)
    before = _file_stats(output, [1, 3])

    manifest = build_cache(_config(llama_dir, dataset, output, num_workers=2, worker_index=1, resume=True),
                           teacher=teacher)
    assert manifest.worker == {"index": 1, "count": 2, "stream_samples": NUM_SAMPLES} and manifest.complete
    assert manifest.num_samples == 18
    assert _file_stats(output, [1, 3]) == before  # committed shards are not rewritten
    assert in_flight.exists(), "a worker removed another worker's shard in flight"
    assert not own[0].exists()
    assert not (output / "manifest.json").exists()  # worker 0 has not finished: no merge yet
    with pytest.raises(RuntimeError, match="build incomplete: worker 0 of 2 has not finished"):
        open_store(output)

    merged = build_cache(_config(llama_dir, dataset, output, num_workers=2, worker_index=0, resume=True),
                         teacher=teacher)
    assert merged.worker is None and merged.complete and merged.num_samples == NUM_SAMPLES
    assert not in_flight.exists()
    assert_equals_reference(output, reference, packed_stream)


# --- merge --------------------------------------------------------------------------------------------------------


def test_merge_names_what_is_missing_and_runs_by_hand(tmp_path, monkeypatch, llama_dir, dataset, teacher, reference,
                                                     packed_stream):
    output = tmp_path / "store"
    own = build_cache(_config(llama_dir, dataset, output, num_workers=2, worker_index=0), teacher=teacher)
    assert own.worker is not None and own.num_samples == 6 + 6 + 6 + 4

    result = _cli("merge", output)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Cannot merge" in result.output and "worker 1 of 2 has not finished (1 has not started)" in result.output
    assert not (output / "manifest.json").exists()
    for command in ("verify", "export"):
        result = _cli(command, output, *(["out.parquet"] if command == "export" else []))
        assert result.exit_code == 1 and "build incomplete: worker 1 of 2 has not finished" in result.output
    result = _cli("info", output, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workers"] == [
        {"worker": 0, "of": 2, "state": "finished", "shards": 4, "samples": 22, "tokens": own.num_tokens},
        {"worker": 1, "of": 2, "state": "not started", "shards": 0, "samples": 0, "tokens": 0},
    ]
    result = _cli("info", output)
    assert result.exit_code == 0 and "1 of 2 finished" in result.output and "not started" in result.output

    # Worker 1 stops between its last commit and the merge.
    with monkeypatch.context() as patch:
        patch.setattr("teacher_cache.build.merge_if_finished", lambda location: None)
        build_cache(_config(llama_dir, dataset, output, num_workers=2, worker_index=1), teacher=teacher)
    assert not (output / "manifest.json").exists()
    with pytest.raises(RuntimeError, match="build not merged: all 2 workers have finished; run `teacher-cache merge"):
        open_store(output)

    # Rerunning the worker with --resume merges too.
    rerun = Path(shutil.copytree(output, tmp_path / "rerun"))
    merged = build_cache(_config(llama_dir, dataset, rerun, num_workers=2, worker_index=1, resume=True),
                         teacher=teacher)
    assert merged.worker is None and merged.num_samples == NUM_SAMPLES
    assert_equals_reference(rerun, reference, packed_stream)

    # A worker manifest that lost a shard: the merge names it and writes nothing.
    tampered = Path(shutil.copytree(output, tmp_path / "tampered"))
    path = tampered / "workers" / "worker-00001-of-00002.json"
    data = json.loads(path.read_text())
    data["shards"] = [s for s in data["shards"] if s["name"] != "shards/shard-000003"]
    write_manifest(path, data)
    result = _cli("merge", tampered)
    assert result.exit_code == 1 and "shards 3 of 0..6 are absent (40 samples in the stream)" in result.output
    assert not (tampered / "manifest.json").exists()

    result = _cli("merge", output)
    assert result.exit_code == 0, result.output
    assert f"is complete: {NUM_SAMPLES} samples" in result.output
    assert_equals_reference(output, reference, packed_stream)
    again = _cli("merge", output)  # idempotent
    assert again.exit_code == 0 and again.output == result.output
    assert_equals_reference(output, reference, packed_stream)

    # A store of workers can be concatenated with others once merged, not before.
    result = _cli("merge", tampered, reference, "--output", tmp_path / "joined")
    assert result.exit_code == 2 and "build not merged" in result.output and not (tmp_path / "joined").exists()
    result = _cli("merge", output, reference, "--output", tmp_path / "joined")
    assert result.exit_code == 0 and f"Wrote {2 * NUM_SAMPLES} samples" in result.output, result.output


def test_more_workers_than_shards(tmp_path, llama_dir, dataset, teacher):
    """3 workers, 2 shards (--max-samples 10): worker 2 computes nothing, and the merge still has it all."""
    reference = tmp_path / "reference"
    build_cache(_config(llama_dir, dataset, reference, max_samples=10), teacher=teacher)
    output = tmp_path / "store"
    for index in (2, 0, 1):
        manifest = build_cache(_config(llama_dir, dataset, output, max_samples=10, num_workers=3, worker_index=index),
                               teacher=teacher)
        assert manifest.num_samples == {2: 0, 0: 6, 1: 10}[index]  # the last one (1) returns the merged store
    store, ref = open_store(output), open_store(reference)
    assert [asdict(s) for s in store.manifest.shards] == [asdict(s) for s in ref.manifest.shards]
    assert [s.num_samples for s in store.manifest.shards] == [6, 4]


# --- refusals -----------------------------------------------------------------------------------------------------


def test_workers_with_other_options_are_refused(tmp_path, llama_dir, dataset, teacher):
    output = tmp_path / "store"
    build_cache(_config(llama_dir, dataset, output, max_samples=12, num_workers=2, worker_index=0), teacher=teacher)
    listing = sorted(os.listdir(output / "workers"))

    with pytest.raises(ValueError, match=r"(?s)Worker 1 of 2 cannot join.*worker 0 was started with other options.*"
                                         r"build\.seed: worker 0 has 7, worker 1 has 8"):
        build_cache(_config(llama_dir, dataset, output, max_samples=12, seed=8, num_workers=2, worker_index=1),
                    teacher=teacher)
    with pytest.raises(ValueError, match=r"being built by 2 workers .*--num-workers 3"):
        build_cache(_config(llama_dir, dataset, output, max_samples=12, num_workers=3, worker_index=1),
                    teacher=teacher)
    assert sorted(os.listdir(output / "workers")) == listing  # the refused workers left nothing behind
    with pytest.raises(ValueError, match="not empty"):
        build_cache(_config(llama_dir, dataset, output, max_samples=12), teacher=teacher)
    with pytest.raises(ValueError, match="built by several workers.*--worker-index"):
        build_cache(_config(llama_dir, dataset, output, max_samples=12, resume=True), teacher=teacher)

    build_cache(_config(llama_dir, dataset, output, max_samples=12, num_workers=2, worker_index=1), teacher=teacher)
    with pytest.raises(ValueError, match=r"already complete \(12 samples\); nothing to build"):
        build_cache(_config(llama_dir, dataset, output, max_samples=12, num_workers=2, worker_index=1),
                    teacher=teacher)


def test_cli_worker_options_go_together(tmp_path, llama_dir, dataset):
    args = ["build", "--model", llama_dir, "--dataset", dataset, "--output", tmp_path / "store", *CLI_OPTIONS]
    for extra in (["--num-workers", "2"], ["--worker-index", "1"]):
        result = _cli(*args, *extra)
        assert result.exit_code == 2 and "--num-workers and --worker-index go together" in result.output
    result = _cli(*args, "--num-workers", "2", "--worker-index", "2")
    assert result.exit_code == 2 and "--worker-index: 2 is outside [0, 2)" in result.output
    assert not (tmp_path / "store").exists()


# --- shard selection and the environment ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_iter_batches_gives_each_worker_its_shards(num_workers):
    """29 samples in blocks of uneven size, shards of 5: each sample once over all workers, on its owner."""
    sizes, per_shard = [3, 7, 1, 5, 10, 3], 5

    def blocks():
        start = 0
        for size in sizes:
            ids = np.zeros((size, 3), np.int64)
            ids[:, 0] = np.arange(start, start + size)
            yield Rows(ids, np.ones((size, 3), bool), np.ones((size, 2), bool), np.zeros((size, 3), np.uint16))
            start += size

    seen = []
    for index in range(num_workers):
        for first, batch in iter_batches(blocks(), 2, per_shard, keep=lambda s, i=index: s % num_workers == i):
            assert (first // per_shard) % num_workers == index
            assert first // per_shard == (first + len(batch) - 1) // per_shard
            np.testing.assert_array_equal(batch.input_ids[:, 0], np.arange(first, first + len(batch)))
            seen += batch.input_ids[:, 0].tolist()
    assert sorted(seen) == list(range(29))


@pytest.mark.parametrize("options,environ,expected", [
    ((None, None), {}, (1, 0)),
    ((4, 2), {"WORLD_SIZE": "8", "RANK": "3"}, (4, 2)),  # options win
    ((1, None), {"WORLD_SIZE": "8", "RANK": "3"}, (1, 0)),  # --num-workers 1: one process
    ((None, None), {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (4, 3)),
    ((None, None), {"WORLD_SIZE": "2", "RANK": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
                    "SLURM_PROCID": "5"}, (2, 1)),  # torchrun inside a SLURM step
    ((None, None), {"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, (8, 5)),
    ((None, None), {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, (1, 0)),  # the batch script itself, no srun step
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10"}, (5, 2)),
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
                    "SLURM_ARRAY_TASK_STEP": "2"}, (3, 2)),  # --array=0-4:2
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0",
                    "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, (12, 9)),  # 3 arrays x 4
])
def test_resolve_workers(options, environ, expected):
    assert resolve_workers(*options, environ) == expected


@pytest.mark.parametrize("options,environ,message", [
    ((4, None), {}, "--num-workers and --worker-index go together"),
    ((None, 2), {}, "--num-workers and --worker-index go together"),
    ((None, None), {"WORLD_SIZE": "4", "RANK": "x"}, "RANK='x': expected an integer"),
    ((None, None), {"WORLD_SIZE": "4", "RANK": "4"}, r"worker 4 is outside \[0, 4\)"),
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0"},
     "--array=0-2"),  # --array=0,1,5: not evenly spaced
])
def test_resolve_workers_errors(options, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_workers(*options, environ)


def test_resolve_workers_logs_its_source(caplog):
    with caplog.at_level(logging.INFO, logger="teacher_cache.config"):
        resolve_workers(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1",
                                     "SLURM_ARRAY_TASK_MIN": "0"})
    assert "worker 1 of 2, from SLURM: a job array (SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID)" in caplog.text


@pytest.mark.parametrize("device,backend,environ,cuda,expected", [
    ("auto", "transformers", {"LOCAL_RANK": "3"}, True, "cuda:3"),
    ("auto", "transformers", {"LOCAL_RANK": "3"}, False, "auto"),
    ("auto", "transformers", {}, True, "auto"),
    ("cuda:1", "transformers", {"LOCAL_RANK": "3"}, True, "cuda:1"),  # an explicit device stays
    ("auto", "vllm", {"LOCAL_RANK": "3"}, True, "auto"),
])
def test_worker_device(monkeypatch, device, backend, environ, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert worker_device(device, backend, environ) == expected
