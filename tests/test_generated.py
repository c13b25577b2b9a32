"""The dataset `teacher-cache generate` writes (storage/generated.py): round trip, workers, resume after a kill at
each point of a shard's commit, and a reader that refuses unfinished, tampered or escaping outputs.

Rows are made by hand; expected values (rows, totals, missing shards) are written out independently of the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.fs import Location
from storage.generated import ROW_SCHEMA, GeneratedWriter, is_generated, read_generated
from storage.integrity import StoreDamaged, canonical_digest
from storage.lock import LockError

HEADER = {"generator": {"model": "tiny", "backend": "transformers"},
          "sampling": {"temperature": 0.7, "top_p": 1.0, "seed": 3, "stop": ["\n\n"]},
          "prompts": {"source": "prompts.jsonl", "fingerprint": "f00d"}}
# 7 prompts in shards of 2: shards 0..3 hold prompts [0, 2), [2, 4), [4, 6), [6, 7).
SIZES = {"prompts_per_shard": 2, "num_prompts": 7}
SHARD_PROMPTS = {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6]}


class Killed(Exception):
    """Stands for the process being killed at a given write."""


def row(prompt: int, response: int, answer: str = "") -> dict:
    """A response as the generator would report it; every float is exact in float32."""
    return {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {prompt}"},
                     {"role": "assistant", "content": answer or f"answer {prompt}.{response}"}],
        "prompt_id": prompt, "response_index": response, "finish_reason": "stop" if response == 0 else "length",
        "response_token_ids": [100 + prompt, 200 + response, 2],
        "response_logprobs": [-0.5, -1.25, -0.125 * (prompt + 1)],
        "sampling_logprobs": [-0.25, -1.0, 0.0] if response == 0 else None,
        "prompt_tokens": 10 + prompt, "prompt_token_ids": list(range(3, 13 + prompt)),
    }


def shard_rows(shard: int, answer: str = "") -> list[dict]:
    """Two responses per prompt, except prompt 3, which the filters dropped; prompt 5 keeps one."""
    kept = {3: [], 5: [0]}
    return [row(p, r, answer) for p in SHARD_PROMPTS[shard] for r in kept.get(p, [0, 1])]


def shard_counts(shard: int) -> dict[str, int]:
    rows = len(shard_rows(shard))
    return {"kept": rows, "dropped_length": 2 * len(SHARD_PROMPTS[shard]) - rows}


def open_writer(out: Path, *, resume: bool = False, header: dict = HEADER, index: int = 0,
                workers: int = 1) -> GeneratedWriter:
    return GeneratedWriter.open(str(out), header, resume=resume, worker_index=index, num_workers=workers, **SIZES)


def write_all(writer: GeneratedWriter) -> dict | None:
    for shard in writer.pending():
        writer.write_shard(shard, shard_rows(shard), shard_counts(shard))
    return writer.finish()


def expected_rows() -> list[dict]:
    return [r for shard in range(4) for r in shard_rows(shard)]


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "gen"
    with open_writer(out) as writer:
        assert write_all(writer) is not None
    return out


def rewrite_manifest(out: Path, edit, *, digest: bool) -> None:
    manifest = json.loads((out / "generation.json").read_text())
    edit(manifest)
    if digest:
        manifest["manifest_sha256"] = canonical_digest({k: v for k, v in manifest.items() if k != "manifest_sha256"})
    (out / "generation.json").write_text(json.dumps(manifest))


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


# --- round trip -----------------------------------------------------------------------------------------------------


def test_round_trip_in_prompt_then_response_order(finished):
    dataset, manifest = read_generated(str(finished))
    assert dataset.to_list() == expected_rows()
    # Kept: prompts 0, 1 (2 + 2), 2 (2), 4 (2), 5 (1), 6 (2) = 11 rows; dropped: prompt 3's two and one of prompt 5.
    assert manifest["rows"] == 11 and len(dataset) == 11
    assert manifest["counts"] == {"dropped_length": 3, "kept": 11}
    assert [s["prompts"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 6], [6, 7]]
    assert [s["rows"] for s in manifest["shards"]] == [4, 2, 3, 2]
    assert [s["path"] for s in manifest["shards"]] == [f"data/shard-0000{i}.parquet" for i in range(4)]
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((finished / shard["path"]).read_bytes()).hexdigest()
    assert manifest["format"] == "teacher-cache-generated" and manifest["format_version"] == 2
    assert manifest["sampling"] == HEADER["sampling"] and manifest["prompts_per_shard"] == 2
    assert is_generated(str(finished)) and not is_generated(str(finished / "data"))


def test_datasets_sees_conversations(finished):
    dataset, manifest = read_generated(str(finished))
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.features["messages"] == datasets.List({"role": datasets.Value("string"),
                                                          "content": datasets.Value("string")})
    assert dataset[1]["messages"][-1] == {"role": "assistant", "content": "answer 0.1"}
    assert dataset._fingerprint == manifest["manifest_sha256"]
    assert pq.read_table(finished / "data" / "shard-00000.parquet").schema.field("messages").type \
        == ROW_SCHEMA.field("messages").type


# --- workers --------------------------------------------------------------------------------------------------------


def test_two_workers_each_write_their_shards_and_the_last_finishes(tmp_path, caplog):
    out = tmp_path / "gen"
    with open_writer(out, index=1, workers=2) as second:
        assert second.pending() == [1, 3]
        with caplog.at_level(logging.INFO, logger="storage.generated"):
            assert write_all(second) is None
        assert "waiting for shards 0, 2 (of workers 0 of 2)" in caplog.text
    assert not (out / "generation.json").exists()
    with pytest.raises(ValueError, match=r"shards 0, 2 of 0\.\.3 are missing.*--resume"):
        read_generated(str(out))
    with open_writer(out, index=0, workers=2) as first:  # joins without --resume: it has written nothing yet
        assert first.pending() == [0, 2]
        manifest = write_all(first)
    assert manifest is not None
    assert read_generated(str(out))[0].to_list() == expected_rows()
    before = (out / "generation.json").read_bytes()
    with open_writer(out, index=1, workers=2, resume=True) as second:  # finishing twice writes the same bytes
        assert second.pending() == [] and second.finish() == manifest
    assert (out / "generation.json").read_bytes() == before


def test_a_worker_with_other_options_cannot_join(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out, index=0, workers=2):
        pass
    other = {**HEADER, "sampling": {**HEADER["sampling"], "temperature": 1.0}}
    with pytest.raises(ValueError, match=r"sampling\.temperature: the output has 0\.7, this run has 1\.0"):
        open_writer(out, header=other, index=1, workers=2)


def test_a_worker_that_has_written_needs_resume(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out, index=1, workers=2) as writer:
        writer.write_shard(1, shard_rows(1), shard_counts(1))
    with pytest.raises(ValueError, match="Worker 1 of 2 has already written.*--resume"):
        open_writer(out, index=1, workers=2)


def test_the_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out), pytest.raises(LockError, match="locked by another writer"):
        open_writer(out, resume=True)


# --- resume ---------------------------------------------------------------------------------------------------------


def test_kill_between_parquet_and_sidecar_rewrites_the_shard(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    original = Location.write_bytes_atomic

    def killed_at_sidecar_1(self, rel, data):
        if rel == "data/shard-00001.json":
            raise Killed
        original(self, rel, data)

    monkeypatch.setattr(Location, "write_bytes_atomic", killed_at_sidecar_1)
    with pytest.raises(Killed), open_writer(out) as writer:
        for shard in writer.pending():
            writer.write_shard(shard, shard_rows(shard, answer="first try"), shard_counts(shard))
    monkeypatch.setattr(Location, "write_bytes_atomic", original)
    assert (out / "data" / "shard-00001.parquet").exists() and not (out / "data" / "shard-00001.json").exists()

    with open_writer(out, resume=True) as writer:
        assert writer.pending() == [1, 2, 3]
        assert write_all(writer) is not None
    rows = read_generated(str(out))[0].to_list()
    assert rows[:4] == shard_rows(0, answer="first try")  # committed before the kill: kept
    assert rows[4:] == [r for shard in (1, 2, 3) for r in shard_rows(shard)]  # shard 1 written again


def test_resume_skips_committed_shards_without_touching_them(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out) as writer:
        for shard in (0, 1):
            writer.write_shard(shard, shard_rows(shard), shard_counts(shard))
    files = [out / "data" / f"shard-0000{i}.{ext}" for i in (0, 1) for ext in ("parquet", "json")]
    stats = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    with open_writer(out, resume=True) as writer:
        assert writer.pending() == [2, 3]
        assert write_all(writer) is not None
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stats
    assert read_generated(str(out))[0].to_list() == expected_rows()


def test_resume_rewrites_a_shard_that_does_not_match_its_sidecar(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out) as writer:
        for shard in (0, 1):
            writer.write_shard(shard, shard_rows(shard), shard_counts(shard))
    (out / "data" / "shard-00000.parquet").write_bytes(parquet_bytes(shard_rows(0, answer="replaced")))
    with open_writer(out, resume=True) as writer:
        assert writer.pending() == [0, 2, 3]


def test_resume_repairs_a_damaged_shard_of_a_finished_output(finished):
    (finished / "data" / "shard-00002.parquet").write_bytes(b"damaged")
    with open_writer(finished, resume=True) as writer:
        assert writer.pending() == [2]
        writer.write_shard(2, shard_rows(2), shard_counts(2))
        # Until it is finished again, the output reads as unfinished, not as the old manifest.
        with pytest.raises(ValueError, match="all 4 shards are written, but not generation.json"):
            read_generated(str(finished))
        assert writer.finish() is not None
    assert read_generated(str(finished))[0].to_list() == expected_rows()


def test_resume_removes_only_this_workers_temporaries(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out, index=0, workers=2):
        pass
    mine = [out / "data" / ".shard-00002.parquet.tmp-host-11", out / "data" / ".shard-00000.json.tmp-host-12"]
    theirs = out / "data" / ".shard-00001.parquet.tmp-host-13"
    for path in [*mine, theirs]:
        path.write_bytes(b"partial")
    with open_writer(out, index=0, workers=2, resume=True):
        pass
    assert not any(path.exists() for path in mine) and theirs.exists()


def test_resume_with_other_options_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out) as writer:
        writer.write_shard(0, shard_rows(0), shard_counts(0))
    (out / "data" / ".shard-00001.parquet.tmp-host-11").write_bytes(b"partial")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = {**HEADER, "prompts": {**HEADER["prompts"], "fingerprint": "beef"}}
    with pytest.raises(ValueError, match=r"prompts\.fingerprint: the output has 'f00d', this run has 'beef'"):
        open_writer(out, header=other, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_existing_output_needs_resume(finished, tmp_path):
    with pytest.raises(ValueError, match="already holds a `teacher-cache generate` output. Pass --resume"):
        open_writer(finished)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files of no `teacher-cache generate` output \(notes.txt\)"):
        open_writer(foreign, resume=True)


# --- the reader refuses what it cannot trust -------------------------------------------------------------------------


def test_unfinished_output_names_the_missing_shards(tmp_path):
    out = tmp_path / "gen"
    with open_writer(out) as writer:
        for shard in (0, 2):
            writer.write_shard(shard, shard_rows(shard), shard_counts(shard))
    assert is_generated(str(out))
    with pytest.raises(ValueError, match=r"unfinished.*shards 1, 3 of 0\.\.3 are missing.*--resume"):
        read_generated(str(out))


def test_tampered_shard_is_refused(finished):
    # A valid Parquet file with the same number of rows: only its checksum tells it apart.
    (finished / "data" / "shard-00001.parquet").write_bytes(parquet_bytes(shard_rows(1, answer="forged")))
    with pytest.raises(StoreDamaged, match="data/shard-00001.parquet does not match its SHA-256"):
        read_generated(str(finished))


def test_tampered_manifest_is_refused(finished):
    rewrite_manifest(finished, lambda m: m["sampling"].update(temperature=0.0), digest=False)
    with pytest.raises(StoreDamaged, match="generation.json does not match its manifest_sha256"):
        read_generated(str(finished))


def test_row_count_that_disagrees_with_the_shard_is_refused(finished):
    def edit(manifest):
        manifest["shards"][2]["rows"] += 1
        manifest["rows"] += 1

    rewrite_manifest(finished, edit, digest=True)
    with pytest.raises(StoreDamaged, match="data/shard-00002.parquet holds 3 rows, generation.json records 4"):
        read_generated(str(finished))


def test_manifest_naming_a_path_outside_the_output_is_refused(finished):
    # ../x.parquet exists and matches the checksum the manifest gives it: only the path check stops the read.
    data = parquet_bytes(shard_rows(0, answer="outside"))
    (finished.parent / "x.parquet").write_bytes(data)

    def edit(manifest):
        manifest["shards"][0].update(path="../x.parquet", sha256=hashlib.sha256(data).hexdigest())

    rewrite_manifest(finished, edit, digest=True)
    with pytest.raises(StoreDamaged, match=r"shard 0 has path '\.\./x\.parquet', not 'data/shard-00000\.parquet'"):
        read_generated(str(finished))


def test_not_a_generated_output(tmp_path):
    assert not is_generated(str(tmp_path))
    with pytest.raises(ValueError, match="is not a `teacher-cache generate` output"):
        read_generated(str(tmp_path))
