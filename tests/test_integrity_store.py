"""A damaged store is an error, never wrong targets: fault injection on a small store, one case per way to damage it.

Each test copies a freshly built store, damages the copy the way a disk, a bad copy or a hand edit would, and
checks that every reader refuses it: `open_store` / reading a sample (a `StoreDamaged` naming the store, the shard,
the array or file), `teacher-cache verify` (exit 1, the damage listed), `teacher-cache export` and `student-train`
(exit 1 with the message, no traceback). Damage is found by the manifest's digest, its self-consistency checks, the
SHA-256 of each file a reader touches, and with `--no-verify` still by each file's presence and size.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_small_store, make_student_config

from storage import open_store
from storage.integrity import StoreDamaged
from student_train.cli import main as train_main
from teacher_cache.cli import main as cache_main

SHARD = "shards/shard-000001"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """A complete store of several shards of 8 samples (top-8 + 16 draws), built once; tests damage copies of it."""
    store = make_small_store(tmp_path_factory.mktemp("integrity"), llama_dir, corpus_texts[:30])
    assert len(json.loads((store / "manifest.json").read_text())["shards"]) >= 3
    return store


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("student"), llama_dir)


@pytest.fixture
def store(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "store"))


def manifest_of(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def write_manifest(store: Path, manifest: dict, *, redigest: bool) -> None:
    """Write an edited manifest; with `redigest`, recompute its digest as FORMAT.md defines it (a deliberate edit
    that leaves the manifest's own checksum valid, so only its self-consistency checks can catch it)."""
    manifest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    if redigest:
        canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        manifest["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))


def chunk_file(store: Path, array: str) -> Path:
    """The (single, sharded) chunk file of `array` in shard 1."""
    files = [p for p in (store / SHARD / array / "c").rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def read_everything(store: Path, *, verify: bool = True) -> None:
    opened = open_store(store, verify=verify)
    for shard in opened.iter_shards():
        shard.read()
        shard.stats()


def assert_refused(store: Path, *fragments: str, verify: bool = True) -> StoreDamaged:
    """Opening or reading the store raises StoreDamaged naming the store and every fragment."""
    with pytest.raises(StoreDamaged) as caught:
        read_everything(store, verify=verify)
    message = str(caught.value)
    assert str(store.resolve()) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return caught.value


def assert_cli_refuses(store: Path, student: Path, tmp_path: Path, *fragments: str) -> None:
    """`teacher-cache verify`, `teacher-cache export` and `student-train` all fail with a message, no traceback."""
    runs = {
        "verify": CliRunner().invoke(cache_main, ["verify", str(store)]),
        "export": CliRunner().invoke(cache_main, ["export", str(store), str(tmp_path / "out.parquet")]),
        "train": CliRunner().invoke(train_main, [
            "--store", str(store), "--student", str(student), "--output", str(tmp_path / "run"), "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--eval-fraction", "0.1"]),  # an epoch reads every shard
    }
    for name, result in runs.items():
        assert result.exit_code == 1, (name, result.output, result.exception)
        assert "Traceback" not in result.output, (name, result.output)
        for fragment in fragments:
            assert fragment in result.output, (name, fragment, result.output)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_intact_store_reads_and_verifies(store):
    read_everything(store)
    result = CliRunner().invoke(cache_main, ["verify", str(store)])
    assert result.exit_code == 0 and "matches" in result.output, result.output


# --- chunk files: deleted, truncated, bytes flipped ------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("damage", ["deleted", "empty", "shortened"])
def test_missing_or_short_chunk_is_an_error_not_the_fill_value(store, damage, verify):
    path = chunk_file(store, "entropy")
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:0 if damage == "empty" else len(path.read_bytes()) // 2])
    assert_refused(store, SHARD, "entropy", "teacher-cache verify", verify=verify)


@pytest.mark.parametrize("array", ["entropy", "sampled_ids", "topk_ids", "topk_logprob_excess"])
def test_flipped_bytes_are_caught_by_the_checksum(store, array):
    path = chunk_file(store, array)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    error = assert_refused(store, SHARD, f"array {array}", "checksum")
    assert "checksum" in error.problem


def test_damaged_chunk_fails_every_command(store, student, tmp_path):
    path = chunk_file(store, "topk_ids")
    path.write_bytes(path.read_bytes()[:-7])
    assert_cli_refuses(store, student, tmp_path, SHARD, "topk_ids")


@pytest.mark.parametrize("where", ["group", "array"])
def test_damaged_zarr_json_names_the_file(store, where):
    path = store / SHARD / ("zarr.json" if where == "group" else "loss_mask/zarr.json")
    path.write_text(path.read_text()[:40])
    assert_refused(store, SHARD, "zarr.json")
    # Without hashing, the damage is still found (the size differs) and named.
    assert_refused(store, SHARD, verify=False)


def test_missing_shard_directory_names_the_shard(store, student, tmp_path):
    shutil.rmtree(store / SHARD)
    assert_refused(store, SHARD, "missing")
    assert_cli_refuses(store, student, tmp_path, SHARD)


def test_verify_lists_each_damaged_file(store):
    chunk_file(store, "entropy").unlink()
    path = chunk_file(store, "sampled_counts")
    path.write_bytes(b"\0" + path.read_bytes()[1:])
    (store / SHARD / "stray.bin").write_bytes(b"x")
    result = CliRunner().invoke(cache_main, ["verify", str(store)])
    assert result.exit_code == 1
    lines = [line.strip() for line in result.output.splitlines()]
    assert f"{SHARD}/{chunk_file_name(store, 'entropy')}: missing" in lines, result.output
    assert f"{SHARD}/{chunk_file_name(store, 'sampled_counts')}: checksum mismatch" in lines, result.output
    assert f"{SHARD}/stray.bin: not in the manifest" in lines, result.output


def chunk_file_name(store: Path, array: str) -> str:
    """`array`/c/... of shard 1, relative to the shard, as the manifest lists it."""
    names = [rel for rel in manifest_of(store)["shards"][1]["files"] if rel.startswith(f"{array}/c/")]
    assert len(names) == 1
    return names[0]


# --- the manifest: edited, inconsistent, escaping the store ------------------------------------------------------


def _fewer_samples(m):
    m["shards"][1]["num_samples"] -= 2


def _dropped_shard(m):
    del m["shards"][1]


def _seq_len(m):
    m["build"]["seq_len"] = 16


def _top_k(m):
    m["targets"]["topk"]["k"] = 4


def _incomplete(m):
    m["complete"] = False


def _older_version(m):
    m["format_version"] = 3


EDITS = {"fewer samples": _fewer_samples, "dropped shard": _dropped_shard, "seq_len": _seq_len, "k": _top_k,
         "complete false": _incomplete, "version": _older_version}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_manifest_is_refused_by_every_command(store, student, tmp_path, edit):
    manifest = manifest_of(store)
    EDITS[edit](manifest)  # valid JSON, and the recorded digest left as it was
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert_refused(store, "manifest_sha256")
    assert_cli_refuses(store, student, tmp_path, "manifest_sha256")


@pytest.mark.parametrize("edit", ["fewer samples", "seq_len", "k"])
def test_edits_that_keep_a_valid_digest_are_caught_by_the_arrays(store, edit):
    """An edit that recomputes the digest (or a version 3 store, which has none) still disagrees with the arrays."""
    manifest = manifest_of(store)
    EDITS[edit](manifest)
    for shard in manifest["shards"]:  # keep the counts consistent with each other, so only the arrays can tell
        shard["num_positions"] = shard["num_samples"] * manifest["build"]["seq_len"]
        shard["num_tokens"] = min(shard["num_tokens"], shard["num_positions"])
    for total in ("samples", "positions", "tokens"):
        manifest["totals"][total] = sum(s[f"num_{total}"] for s in manifest["shards"])
    write_manifest(store, manifest, redigest=True)
    error = assert_refused(store, "has shape")
    result = CliRunner().invoke(cache_main, ["verify", str(store)])
    assert result.exit_code == 1 and "has shape" in result.output, result.output
    assert error.problem.split(",")[0] in result.output


def test_dropped_shard_with_a_valid_digest_is_caught_by_the_shard_indices(store):
    manifest = manifest_of(store)
    removed = manifest["shards"].pop(1)
    for total, key in (("samples", "num_samples"), ("positions", "num_positions"), ("tokens", "num_tokens")):
        manifest["totals"][total] -= removed[key]
    write_manifest(store, manifest, redigest=True)
    with pytest.raises(StoreDamaged, match="a complete store lists shards 0, 2, 3"):
        open_store(store)


def test_totals_that_disagree_with_the_shards_are_refused(store):
    manifest = manifest_of(store)
    manifest["totals"]["tokens"] += 1
    write_manifest(store, manifest, redigest=True)
    with pytest.raises(StoreDamaged, match="totals.tokens"):
        open_store(store)


@pytest.mark.parametrize("name", ["../../x", "/etc", "shards/../../x", "shards/shard-000001/../../../x",
                                  "shards\\shard-000001", "s3://bucket/shard-000001"])
def test_shard_names_outside_the_store_are_refused(store, student, tmp_path, name):
    manifest = manifest_of(store)
    manifest["shards"][1]["name"] = name
    write_manifest(store, manifest, redigest=True)
    with pytest.raises(StoreDamaged, match="not of the form shards/shard-NNNNNN"):
        open_store(store)
    result = CliRunner().invoke(cache_main, ["verify", str(store)])
    assert result.exit_code == 1 and "not of the form" in result.output


@pytest.mark.parametrize("rel", ["../shard-000000/entropy/c/0/0", "/etc/passwd", "entropy/../../x", "./zarr.json"])
def test_file_names_outside_the_shard_are_refused(store, rel):
    """`verify` would hash, and a copy would read, a file outside the store."""
    outside = store.parent / "secret"
    outside.write_text("not the store's")
    manifest = manifest_of(store)
    manifest["shards"][1]["files"][rel] = hashlib.sha256(b"not the store's").hexdigest()
    write_manifest(store, manifest, redigest=True)
    with pytest.raises(StoreDamaged, match="not a plain path inside its shard"):
        open_store(store)


def test_version_3_store_without_digest_still_reads(store):
    """Stores written before the digest (version 3) are read, with the self-consistency and file checks."""
    manifest = manifest_of(store)
    manifest["format_version"] = 3
    write_manifest(store, manifest, redigest=False)
    opened = open_store(store)
    assert opened.manifest.format_version == 3
    assert opened[0]["topk_ids"].shape == (32, 8)
    chunk_file(store, "entropy").unlink()
    assert_refused(store, "entropy")


def test_checked_reads_equal_unchecked_reads(pristine):
    """Verification changes nothing that is read from an intact store."""
    checked, unchecked = open_store(pristine), open_store(pristine, verify=False)
    for i in (0, len(checked) // 2, len(checked) - 1):
        a, b = checked[i], unchecked[i]
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), name


# --- repair: the damaged shards rebuilt by the build's resume --------------------------------------------------------


def test_repair_then_resume_rebuilds_exactly_the_damaged_shards(store, pristine, llama_dir):
    chunk_file(store, "topk_ids").unlink()
    (store / "shards/shard-000003/entropy/zarr.json").write_text("{}")
    untouched = {p: p.stat().st_mtime_ns for p in (store / "shards/shard-000000").rglob("*") if p.is_file()}

    result = CliRunner().invoke(cache_main, ["verify", str(store), "--repair"])
    assert result.exit_code == 0, result.output
    assert "dropped 2 damaged shard(s)" in result.output and "--resume" in result.output
    manifest = manifest_of(store)
    assert not manifest["complete"]
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in manifest_of(pristine)["shards"]
                                                       if s["name"] not in (SHARD, "shards/shard-000003")]

    # The same build, resumed: the two shards are computed again, the others are not touched.
    from teacher_cache import BuildConfig, build_cache

    build_cache(BuildConfig(model=str(llama_dir), dataset=str(pristine.parent / "docs.jsonl"), output=str(store),
                            seq_len=32, batch_size=4, samples_per_shard=8, top_k=8, num_draws=16, device="cpu",
                            dtype="float32", resume=True))
    rebuilt, reference = manifest_of(store), manifest_of(pristine)
    assert rebuilt["complete"]
    assert [(s["name"], s["files"]) for s in rebuilt["shards"]] == [
        (s["name"], s["files"]) for s in reference["shards"]]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    for shard in reference["shards"]:  # every file as the undamaged build wrote it, hashed here
        for rel, digest in shard["files"].items():
            assert hashlib.sha256((store / shard["name"] / rel).read_bytes()).hexdigest() == digest


def test_repair_leaves_an_intact_store_and_refuses_a_damaged_manifest(store):
    before = (store / "manifest.json").read_bytes()
    result = CliRunner().invoke(cache_main, ["verify", str(store), "--repair"])
    assert result.exit_code == 0 and "nothing is damaged" in result.output
    assert (store / "manifest.json").read_bytes() == before
    manifest = manifest_of(store)
    manifest["shards"][0]["num_tokens"] -= 1  # an edit: the digest no longer matches
    (store / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cache_main, ["verify", str(store), "--repair"])
    assert result.exit_code == 1 and "manifest_sha256" in result.output and "Traceback" not in result.output
