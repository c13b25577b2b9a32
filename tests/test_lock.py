"""One writer per output: the lock of `storage/lock.py`, and the cleanup a resumed writer does under it.

A second build, merge or training run into an output whose lock is held by a live process, or by another host, is
refused naming the owner and the lock file; a lock left by a process of this host that no longer runs is taken
over. Workers of one build lock only their own part. Locks are gone once a command ends, also when it fails.
Temporaries of a manifest write that a killed writer left are removed on resume, a worker's only its own.

Builds are tiny: 4 samples of 32 positions from one tiny teacher, in shards of 2 (2 shards).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_student_config, write_jsonl

from storage import open_store
from storage.concat import concat_stores
from storage.lock import LockError
from storage.writer import StoreWriter
from student_train.cli import main as student_main
from teacher_cache import BuildConfig, build_cache
from teacher_cache.cli import main
from teacher_cache.teacher import TransformersTeacher

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
OPTIONS = dict(seq_len=32, batch_size=2, samples_per_shard=2, max_samples=4, top_k=8, num_draws=10, device="cpu",
               dtype="float32")
CLI_OPTIONS = ["--seq-len", "32", "--batch-size", "2", "--samples-per-shard", "2", "--max-samples", "4", "--top-k",
               "8", "--samples", "10", "--device", "cpu", "--dtype", "float32"]
# Takes the lock of the output in argv[1] through the library, says so, and holds it until killed.
HOLD_LOCK = """
import sys, time
from storage.fs import Location
from storage.lock import OutputLock
with OutputLock(Location(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lock-data") / "docs.jsonl", corpus_texts[:10])


@pytest.fixture(scope="module")
def teacher(llama_dir) -> TransformersTeacher:
    return TransformersTeacher(str(llama_dir), device="cpu", dtype="float32")


def _config(llama_dir, dataset, output, **overrides) -> BuildConfig:
    return BuildConfig(model=str(llama_dir), dataset=str(dataset), output=str(output), **{**OPTIONS, **overrides})


def _cli_build(llama_dir, dataset, output, *extra: str):
    return CliRunner().invoke(main, ["build", "--model", str(llama_dir), "--dataset", str(dataset), "--output",
                                     str(output), *CLI_OPTIONS, *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, dataset, teacher) -> Path:
    output = tmp_path_factory.mktemp("lock-store") / "store"
    build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    return output


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of an output; it is killed at the end of the test."""
    procs = []

    def start(output: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _write_lock(path: Path, **fields) -> None:
    record = {"host": HOST, "pid": os.getpid(), "start_time": None, "command": "teacher-cache build --output x",
              "since": "2024-01-01T00:00:00+00:00", **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _on_first_commit(monkeypatch, action) -> list:
    """Run `action()` once, right after the build's first shard commit (its lock held); collects what it returns."""
    original, seen, started = StoreWriter.write_shard, [], []

    def write_shard(self, index, record):
        info = original(self, index, record)
        if not started:  # once: not again in the commits of a build that `action` runs
            started.append(index)
            seen.append(action())
        return info

    monkeypatch.setattr(StoreWriter, "write_shard", write_shard)
    return seen


def _fail_after_first_commit(monkeypatch) -> None:
    original = StoreWriter.write_shard

    def write_shard(self, index, record):
        original(self, index, record)
        raise OSError("injected failure after a commit")

    monkeypatch.setattr(StoreWriter, "write_shard", write_shard)


def _assert_refused(result, owner_pid: int, lock_file: Path, *fragments: str) -> None:
    """Exit code 1 (a click error, no traceback), the owner's pid and host, and the lock file to delete."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in (f"pid {owner_pid} on host", f"delete {lock_file}", *fragments):
        assert fragment in text, (fragment, result.output)


# --- two writers --------------------------------------------------------------------------------------------------


def test_second_build_while_the_first_runs_is_refused(tmp_path, llama_dir, dataset, teacher, monkeypatch):
    output = tmp_path / "store"

    def second_build():
        with pytest.raises(LockError) as refused:
            build_cache(_config(llama_dir, dataset, output, resume=True), teacher=teacher)
        return refused.value, json.loads((output / ".lock").read_text())

    seen = _on_first_commit(monkeypatch, second_build)
    manifest = build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    error, lock = seen[0]
    assert f"pid {os.getpid()} on host {HOST}" in str(error) and str(output / ".lock") in str(error)
    assert (lock["host"], lock["pid"]) == (HOST, os.getpid())
    # The first build was not disturbed, and leaves no lock behind.
    assert manifest.complete and manifest.num_samples == 4
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]
    assert open_store(output).verify() == []


def test_lock_is_released_after_success_and_after_a_failure(tmp_path, llama_dir, dataset, teacher, monkeypatch):
    output = tmp_path / "store"
    with monkeypatch.context() as patch:
        _fail_after_first_commit(patch)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    assert not (output / ".lock").exists()
    # Held while the resumed build runs, gone after it.
    seen = _on_first_commit(monkeypatch, lambda: json.loads((output / ".lock").read_text()))
    build_cache(_config(llama_dir, dataset, output, resume=True), teacher=teacher)
    assert (seen[0]["host"], seen[0]["pid"]) == (HOST, os.getpid())
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]


def test_failed_build_into_a_new_output_leaves_nothing(tmp_path, llama_dir, dataset):
    output = tmp_path / "store"
    result = _cli_build(llama_dir, dataset, output, "--top-k", "40000")
    assert result.exit_code == 2 and "exceeds the teacher's vocabulary" in result.output
    assert not output.exists()


def test_lock_of_a_live_process_is_refused_and_taken_over_once_it_is_gone(tmp_path, llama_dir, dataset, holder,
                                                                         caplog):
    output = tmp_path / "store"
    proc = holder(output)
    result = _cli_build(llama_dir, dataset, output)
    _assert_refused(result, proc.pid, output / ".lock", f"pid {proc.pid} on host {HOST}", "Wait for it to finish")
    assert not (output / "manifest.json").exists()
    # Killed: its lock file stays, and names a process that no longer runs.
    proc.kill()
    proc.wait()
    assert json.loads((output / ".lock").read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        result = _cli_build(llama_dir, dataset, output)
    assert result.exit_code == 0, result.output
    assert f"pid {proc.pid} on {HOST}" in caplog.text and "no longer runs" in caplog.text
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, llama_dir, dataset, teacher, caplog):
    output = tmp_path / "store"
    dead = _dead_pid()
    # start_time 1 (a tick after boot): should the pid have been reused meanwhile, the start time tells it apart.
    _write_lock(output / ".lock", pid=dead, start_time=1)
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        manifest = build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    assert manifest.complete and manifest.num_samples == 4
    assert f"pid {dead} on {HOST}" in caplog.text
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]


def test_lock_of_another_host_is_refused_with_the_delete_hint(tmp_path, llama_dir, dataset, store):
    lock = tmp_path / "store" / ".lock"
    _write_lock(lock, host="node-elsewhere.invalid", pid=4242, command="teacher-cache build --output /somewhere")
    result = _cli_build(llama_dir, dataset, tmp_path / "store")
    _assert_refused(result, 4242, lock, "host node-elsewhere.invalid", "another host", "teacher-cache build --output "
                    "/somewhere", "since 2024-01-01T00:00:00+00:00")
    assert sorted(os.listdir(tmp_path / "store")) == [".lock"]  # nothing written, the lock left as it was
    # The same for a merge into it, and for finishing it as a store of workers.
    _assert_refused(CliRunner().invoke(main, ["merge", str(store), str(store), "--output", str(tmp_path / "store")]),
                    4242, lock, "another host")
    _assert_refused(CliRunner().invoke(main, ["merge", str(tmp_path / "store")]), 4242, lock, "another host")
    # Deleting it, as the message says, lets the build run.
    lock.unlink()
    assert _cli_build(llama_dir, dataset, tmp_path / "store").exit_code == 0


def test_damaged_lock_is_an_error_naming_it(tmp_path, llama_dir, dataset):
    lock = tmp_path / "store" / ".lock"
    lock.parent.mkdir()
    lock.write_text("{half a lock")
    result = _cli_build(llama_dir, dataset, tmp_path / "store")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Lock file {lock} is damaged" in result.output and "{half a lock" in result.output
    assert lock.read_text() == "{half a lock"


def test_a_lock_being_taken_refuses_without_calling_it_damaged(tmp_path, llama_dir, dataset):
    """Between its O_EXCL creation and the write of its owner, a lock file is empty: another writer starting then is
    refused as one that started at the same moment."""
    lock = tmp_path / "store" / ".lock"
    lock.parent.mkdir()
    lock.write_bytes(b"")
    result = _cli_build(llama_dir, dataset, tmp_path / "store")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "started at the same moment" in result.output and "damaged" not in result.output
    assert lock.read_bytes() == b""


def test_readers_ignore_a_lock_in_a_store(tmp_path, store):
    copy = Path(shutil.copytree(store, tmp_path / "store"))
    _write_lock(copy / ".lock", host="node-elsewhere.invalid")
    for command in (["verify", str(copy)], ["info", str(copy)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
    assert len(open_store(copy)) == 4


# --- workers ------------------------------------------------------------------------------------------------------


def test_workers_lock_only_their_own_part(tmp_path, llama_dir, dataset, teacher, monkeypatch):
    """While worker 0 of 2 builds, worker 1 builds beside it; a second worker 0 is refused."""
    output = tmp_path / "store"
    worker = dict(num_workers=2)

    def beside():
        locks = sorted(name for name in os.listdir(output) if name.startswith(".lock"))
        other = build_cache(_config(llama_dir, dataset, output, **worker, worker_index=1), teacher=teacher)
        with pytest.raises(LockError) as refused:
            build_cache(_config(llama_dir, dataset, output, **worker, worker_index=0, resume=True), teacher=teacher)
        return locks, other, refused.value

    seen = _on_first_commit(monkeypatch, beside)
    merged = build_cache(_config(llama_dir, dataset, output, **worker, worker_index=0), teacher=teacher)
    locks, other, error = seen[0]
    assert locks == [".lock-worker-00000"]
    assert other.worker["index"] == 1 and other.complete  # finished, but not last: its own manifest
    assert f"pid {os.getpid()} on host {HOST}" in str(error)
    assert str(output / ".lock-worker-00000") in str(error)
    # Worker 0 finished last and merged: a whole store, and no lock left.
    assert merged.complete and merged.worker is None and merged.num_samples == 4
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]
    assert open_store(output).verify() == []


# --- student-train ------------------------------------------------------------------------------------------------


def test_student_train_refuses_an_output_locked_by_another_run(tmp_path, store, llama_dir, holder):
    student = make_student_config(tmp_path / "student", llama_dir)
    output = tmp_path / "run"
    proc = holder(output)
    args = ["--store", str(store), "--student", str(student), "--output", str(output), "--max-steps", "1",
            "--batch-size", "1", "--eval-fraction", "0.25", "--device", "cpu"]
    result = CliRunner().invoke(student_main, args)
    _assert_refused(result, proc.pid, output / ".lock", f"pid {proc.pid} on host {HOST}")
    assert sorted(os.listdir(output)) == [".lock"]


# --- cleanup on resume --------------------------------------------------------------------------------------------


def test_resume_removes_what_a_killed_build_left(tmp_path, llama_dir, dataset, teacher, monkeypatch, caplog):
    output = tmp_path / "store"
    with monkeypatch.context() as patch:
        _fail_after_first_commit(patch)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_cache(_config(llama_dir, dataset, output), teacher=teacher)
    # What a writer killed during a manifest write, and during a shard's staging, leaves.
    (output / ".manifest.json.tmp-node7-31337").write_text('{"half": ')
    (output / "shards" / ".tmp-shard-000001-31337" / "input_ids").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="storage.writer"):
        manifest = build_cache(_config(llama_dir, dataset, output, resume=True), teacher=teacher)
    assert manifest.complete and manifest.num_samples == 4
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]
    assert sorted(os.listdir(output / "shards")) == ["shard-000000", "shard-000001"]
    assert ".manifest.json.tmp-node7-31337" in caplog.text and ".tmp-shard-000001-31337" in caplog.text
    assert open_store(output).verify() == []


def test_resumed_worker_removes_only_its_own_temporaries(tmp_path, llama_dir, dataset, teacher, monkeypatch):
    output = tmp_path / "store"
    worker0 = dict(num_workers=2, worker_index=0)
    with monkeypatch.context() as patch:
        _fail_after_first_commit(patch)
        with pytest.raises(RuntimeError, match="injected failure"):
            build_cache(_config(llama_dir, dataset, output, **worker0), teacher=teacher)
    workers = output / "workers"
    own = workers / ".worker-00000-of-00002.json.tmp-node7-1"
    other = workers / ".worker-00001-of-00002.json.tmp-node8-2"
    own_staging, other_staging = output / "shards" / ".tmp-shard-000002-1", output / "shards" / ".tmp-shard-000001-2"
    for path in (own, other):
        path.write_text("{")
    for path in (own_staging, other_staging):
        path.mkdir()
    manifest = build_cache(_config(llama_dir, dataset, output, resume=True, **worker0), teacher=teacher)
    assert manifest.worker == {"index": 0, "count": 2, "stream_samples": 4} and manifest.complete
    assert not own.exists() and not own_staging.exists()
    assert other.read_text() == "{" and other_staging.is_dir()  # worker 1's: it may be writing them
    assert sorted(os.listdir(output)) == ["shards", "workers"]


def test_resumed_merge_removes_its_temporaries(tmp_path, store, monkeypatch):
    output = tmp_path / "merged"
    original, done = StoreWriter.copy_shard, []

    def failing(self, index, source, info):
        done.append(original(self, index, source, info))
        raise OSError("injected failure after a commit")

    with monkeypatch.context() as patch:
        patch.setattr(StoreWriter, "copy_shard", failing)
        with pytest.raises(OSError, match="injected failure"):
            concat_stores([store, store], output)
    assert not (output / ".lock").exists()
    (output / ".merging.json.tmp-node7-1").write_text("{")
    (output / ".manifest.json.tmp-node7-2").write_text("{")
    manifest = concat_stores([store, store], output, resume=True)
    assert manifest.complete and manifest.num_samples == 8
    assert sorted(os.listdir(output)) == ["manifest.json", "shards"]
