"""Store round trips on a tiny random Llama teacher.

Resume is an equivalence test: a build interrupted (by an injected writer failure or a real SIGKILL) and then
resumed must equal an uninterrupted build array for array, without rewriting the shards committed before the
failure. The store is also read back with nothing but `zarr`, `numpy` and `json`, following `storage/FORMAT.md`,
and checked against facts computed independently of the build (the tokenizer's own stream, the embedding table,
a plain forward pass of the teacher). Then `verify`, the Parquet export, fsspec URLs and random access.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_jsonl
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage import open_store
from storage.export import export_parquet
from storage.writer import StoreWriter
from teacher_cache import BuildConfig, build_cache

REPO = Path(__file__).resolve().parents[1]

SEQ_LEN = 32
SAMPLES_PER_SHARD = 4
TOP_K = 8
NUM_DRAWS = 20
NUM_DOCS = 30  # 1250 tokens of Shakespeare: 40 packed samples, the last one padded; 10 shards
OPTIONS = dict(seq_len=SEQ_LEN, batch_size=3, samples_per_shard=SAMPLES_PER_SHARD, top_k=TOP_K, num_draws=NUM_DRAWS,
               seed=7, hidden_layers=(0, -1), device="cpu", dtype="float32")
# Every array a shard of these options holds (FORMAT.md, "Arrays of a shard"); layer -1 of 2 blocks is 2.
ARRAY_NAMES = {"input_ids", "attention_mask", "loss_mask", "segment_ids", "entropy", "true_logprob", "topk_ids",
               "topk_logprobs", "tail_logmass", "sampled_nunique", "sampled_offsets", "sampled_ids",
               "sampled_counts", "hidden_states_0", "hidden_states_2"}
FLAT = ("sampled_ids", "sampled_counts", "sampled_offsets")
# The arrays a shard stores: version 3 keeps `topk_logprobs` as a per-position floor plus the excesses above it.
STORED_NAMES = ARRAY_NAMES - {"topk_logprobs"} | {"topk_logprob_floor", "topk_logprob_excess"}
# Per-sample statistics (FORMAT.md, "Per-sample statistics"), read apart from the samples' arrays.
STATS = {"stats_num_tokens", "stats_entropy", "stats_nll", "stats_tail_mass", "stats_true_rank"}


def _config(model: Path, dataset: Path, output, **overrides) -> BuildConfig:
    return BuildConfig(model=str(model), dataset=str(dataset), output=str(output), **{**OPTIONS, **overrides})


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    return corpus_texts[:NUM_DOCS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("store-data") / "docs.jsonl", texts)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir, dataset) -> Path:
    """An uninterrupted build: what every interrupted-and-resumed build must equal."""
    output = tmp_path_factory.mktemp("reference") / "store"
    build_cache(_config(llama_dir, dataset, output))
    return output


@pytest.fixture(scope="module")
def documents(llama_dir, texts) -> list[list[int]]:
    """Each document's token ids as the tokenizer gives them, EOS appended (FORMAT.md, packed stores)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    docs = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [d if d[-1] == tokenizer.eos_token_id else [*d, tokenizer.eos_token_id] for d in docs]


def _num_packed_samples(documents) -> int:
    stream_len = sum(map(len, documents))
    return math.ceil((stream_len - 1) / SEQ_LEN)


def _manifest_json(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def assert_same_samples(actual, expected, count: int | None = None) -> None:
    """The first `count` samples (all when None) of two opened stores are equal, every array, dtype included."""
    count = len(expected) if count is None else count
    assert len(actual) >= count
    for i in range(count):
        got, want = actual[i], expected[i]
        assert set(got) == set(want) == ARRAY_NAMES
        for name in want:
            assert got[name].dtype == want[name].dtype, (i, name)
            assert np.array_equal(got[name], want[name]), f"sample {i}: {name} differs"


def assert_equals_reference(output: Path, reference: Path) -> None:
    """A finished store equals the reference: same samples, shards and byte-identical shard files."""
    store, ref = open_store(output), open_store(reference)
    assert len(store) == len(ref) == 40
    assert_same_samples(store, ref)
    assert [(s.name, s.num_samples, s.num_tokens, s.files) for s in store.manifest.shards] == [
        (s.name, s.num_samples, s.num_tokens, s.files) for s in ref.manifest.shards
    ]
    assert sorted(os.listdir(output / "shards")) == [f"shard-{i:06d}" for i in range(10)]
    assert store.verify() == []


def _file_stats(root: Path, shard_names: list[str]) -> dict[str, tuple[int, int, str]]:
    out = {}
    for name in shard_names:
        for path in sorted((root / name).rglob("*")):
            if path.is_file():
                st, digest = path.stat(), hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, digest)
    return out


def _leave_crash_leftovers(root: Path, next_index: int) -> list[Path]:
    """What a crash in the middle of committing shard `next_index` can leave, plus an unrelated stray shard."""
    leftovers = [root / "shards" / f".tmp-shard-{next_index:06d}-123", root / "shards" / "shard-000042"]
    if next_index < 10:  # renamed into place, but the manifest was never rewritten
        leftovers.append(root / "shards" / f"shard-{next_index:06d}")
    for path in leftovers:
        (path / "input_ids").mkdir(parents=True)
        (path / "zarr.json").write_text('{"garbage": true}')
        (path / "input_ids" / "zarr.json").write_bytes(b"\x00" * 17)
    return leftovers


# --- resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failed_after", [0, 5, 9], ids=["first-shard", "middle", "last-shard"])
def test_resume_after_injected_failure_equals_uninterrupted(tmp_path, monkeypatch, llama_dir, dataset, reference,
                                                             failed_after):
    output = tmp_path / "store"
    original = StoreWriter.write_shard
    calls = []

    def failing_write_shard(self, index, record):
        info = original(self, index, record)
        calls.append(info.name)
        if len(calls) == failed_after + 1:
            raise OSError("injected failure after a commit")
        return info

    monkeypatch.setattr(StoreWriter, "write_shard", failing_write_shard)
    with pytest.raises(RuntimeError, match="injected failure"):
        build_cache(_config(llama_dir, dataset, output))
    monkeypatch.undo()

    committed = failed_after + 1
    manifest = _manifest_json(output)
    assert manifest["complete"] is False
    assert [s["name"] for s in manifest["shards"]] == [f"shards/shard-{i:06d}" for i in range(committed)]
    with pytest.raises(RuntimeError, match="--resume"):
        open_store(output)
    partial = open_store(output, allow_incomplete=True)
    assert len(partial) == committed * SAMPLES_PER_SHARD
    assert_same_samples(partial, open_store(reference), count=len(partial))

    leftovers = _leave_crash_leftovers(output, committed)
    before = _file_stats(output, [s["name"] for s in manifest["shards"]])
    # group + (zarr.json, one shard file) per array
    assert len(before) == committed * (1 + 2 * len(STORED_NAMES | STATS))

    build_cache(_config(llama_dir, dataset, output, resume=True))

    assert _file_stats(output, [s["name"] for s in manifest["shards"]]) == before  # not rewritten
    assert not leftovers[0].exists() and not leftovers[1].exists()  # the temp dir and the stray shard
    assert _manifest_json(output)["complete"] is True
    assert_equals_reference(output, reference)


def _committed_shards(root: Path) -> int:
    try:
        return len(_manifest_json(root)["shards"])
    except FileNotFoundError:  # not created yet; a torn manifest would fail here (writes are atomic)
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, llama_dir, dataset, reference):
    output = tmp_path / "store"
    command = [
        sys.executable, "-m", "teacher_cache.cli", "build", "--model", str(llama_dir), "--dataset", str(dataset),
        "--output", str(output), "--seq-len", str(SEQ_LEN), "--batch-size", "3", "--samples-per-shard",
        str(SAMPLES_PER_SHARD), "--top-k", str(TOP_K), "--samples", str(NUM_DRAWS), "--seed", "7",
        "--hidden-layers", "0,-1", "--device", "cpu", "--dtype", "float32",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log_path = tmp_path / "build.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # No deadline: the build ends by itself, so the wait ends however slow a loaded machine makes it.
            while process.poll() is None and _committed_shards(output) < 1:
                time.sleep(0.01)
        finally:
            if process.poll() is None:  # mid-build (or the test failed): SIGKILL cannot be ignored, so wait() returns
                process.send_signal(signal.SIGKILL)
            process.wait()
    killed = process.returncode == -signal.SIGKILL
    assert killed or process.returncode == 0, log_path.read_text()[-3000:]

    manifest = _manifest_json(output)
    assert len(manifest["shards"]) >= 1
    if not manifest["complete"]:  # the usual case: killed mid-build
        committed = [s["name"] for s in manifest["shards"]]
        before = _file_stats(output, committed)
        build_cache(_config(llama_dir, dataset, output, resume=True))
        assert _file_stats(output, committed) == before
    assert_equals_reference(output, reference)


# --- reading with zarr alone (FORMAT.md) -------------------------------------------------------------------------


def read_with_zarr(root: Path) -> tuple[dict, list[dict]]:
    """The manifest and every sample, read as FORMAT.md describes: json + zarr + numpy, nothing from this project.

    Each sample holds its dense arrays without the sample axis, and `sampled` = [(ids, counts)] per position.
    """
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "teacher-cache" and manifest["format_version"] == 4
    # What FORMAT.md says a reader must check: the manifest's digest of itself, then every file's SHA-256.
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    samples = []
    for shard in manifest["shards"]:
        for rel, digest in shard["files"].items():
            assert hashlib.sha256((root / shard["name"] / rel).read_bytes()).hexdigest() == digest
        group = zarr.open_group(str(root / shard["name"]), mode="r")
        arrays = {name: array[...] for name, array in group.arrays()}
        # Versions 3 and 4: the top-k log-probs are the position's floor plus each one's excess above it.
        arrays["topk_logprobs"] = arrays.pop("topk_logprob_floor")[..., None] + arrays.pop("topk_logprob_excess")
        offsets, nunique = arrays["sampled_offsets"], arrays["sampled_nunique"]
        assert offsets.shape == (shard["num_samples"] + 1,) and offsets[0] == 0
        assert int(offsets[-1]) == arrays["sampled_ids"].shape[0] == int(nunique.sum())
        for row in range(shard["num_samples"]):
            sample = {name: value[row] for name, value in arrays.items() if name not in FLAT}
            sample["sampled"] = []
            for t in range(nunique.shape[1]):
                start = int(offsets[row] + nunique[row, :t].sum())
                stop = start + int(nunique[row, t])
                sample["sampled"].append((arrays["sampled_ids"][start:stop], arrays["sampled_counts"][start:stop]))
            samples.append(sample)
    return manifest, samples


def test_plain_zarr_reader_agrees_with_open_store(reference):
    manifest, samples = read_with_zarr(reference)
    store = open_store(reference)
    stats = store.stats()
    assert set(stats) == STATS
    assert len(samples) == len(store) == manifest["totals"]["samples"] == 40
    for i, plain in enumerate(samples):
        sample = store[i]
        assert set(plain) - {"sampled"} == (ARRAY_NAMES | STATS) - set(FLAT)
        for name, value in plain.items():
            if name in STATS:
                assert np.array_equal(stats[name][i], value, equal_nan=True), (i, name)
            elif name != "sampled":
                assert np.array_equal(sample[name], value), (i, name)
        assert np.array_equal(sample["sampled_ids"], np.concatenate([ids for ids, _ in plain["sampled"]]))
        assert np.array_equal(sample["sampled_counts"], np.concatenate([c for _, c in plain["sampled"]]))
        assert np.array_equal(sample["sampled_offsets"], [0, sum(len(ids) for ids, _ in plain["sampled"])])


def test_plain_zarr_store_matches_independent_facts(reference, documents, llama_dir):
    manifest, samples = read_with_zarr(reference)
    vocab = manifest["teacher"]["vocab_size"]
    assert vocab == 32000

    # Layout: the packed stream is the tokenizer's own, cut with stride L into L+1 windows; the last one padded.
    stream = np.concatenate([np.asarray(d) for d in documents])
    doc_of_token = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    assert len(samples) == _num_packed_samples(documents)
    for i, s in enumerate(samples):
        window = slice(i * SEQ_LEN, i * SEQ_LEN + SEQ_LEN + 1)
        real = len(stream[window])
        assert s["input_ids"].dtype == np.uint16 and s["input_ids"].shape == (SEQ_LEN + 1,)
        assert np.array_equal(s["input_ids"][:real], stream[window])
        assert np.array_equal(s["attention_mask"], np.arange(SEQ_LEN + 1) < real)
        assert np.array_equal(s["loss_mask"], s["attention_mask"][1:])
        docs = doc_of_token[window]
        assert np.array_equal(s["segment_ids"][:real], docs - docs[0])
        if i + 1 < len(samples):
            assert samples[i + 1]["input_ids"][0] == s["input_ids"][-1]  # consecutive samples share one token
    assert 0 < samples[-1]["attention_mask"].sum() < SEQ_LEN + 1  # the last sample is padded (1250 tokens)
    assert sum(int(s["loss_mask"].sum()) for s in samples) == len(stream) - 1 == manifest["totals"]["tokens"]

    embeddings = load_file(str(llama_dir / "model.safetensors"))["model.embed_tokens.weight"]
    for s in samples:
        mask = s["loss_mask"]
        # Sampled: counts sum to the number of draws at trained positions, nothing elsewhere; ids ascending.
        for t, (ids, counts) in enumerate(s["sampled"]):
            if mask[t]:
                assert counts.sum() == NUM_DRAWS and counts.min() >= 1
                assert np.all(np.diff(ids.astype(np.int64)) > 0) and ids.max() < vocab
            else:
                assert len(ids) == 0
        # Top-k + tail: a full distribution, ids ascending, zero off the loss mask.
        probs = np.exp(s["topk_logprobs"][mask].astype(np.float64))
        np.testing.assert_allclose(probs.sum(-1) + np.exp(s["tail_logmass"][mask].astype(np.float64)), 1.0,
                                   atol=math.expm1(1 / 128))  # each value within 1/128 nat
        assert np.all(np.diff(s["topk_ids"][mask].astype(np.int64), axis=-1) > 0)  # ascending ids
        assert np.all(s["topk_ids"][~mask] == 0) and np.all(s["topk_logprobs"][~mask] == 0)
        assert np.all(s["entropy"][~mask] == 0) and np.all(s["true_logprob"][~mask] == 0)
        # Entropy is at least the top-k part of -sum p log p; the true token's log-prob where it is in the top-k.
        partial = -(probs * s["topk_logprobs"][mask]).sum(-1)
        assert np.all(s["entropy"][mask] >= partial - 1e-2)
        true_next = s["input_ids"][1:][mask]
        hit = s["topk_ids"][mask] == true_next[:, None]
        np.testing.assert_allclose(s["true_logprob"][mask][hit.any(-1)],
                                   s["topk_logprobs"][mask][hit].astype(np.float32), rtol=0, atol=1 / 128 + 1e-6)
        # Hidden state 0 is the embedding of the input token at trained positions, zero elsewhere.
        expected = np.where(mask[:, None], embeddings[s["input_ids"][:-1]], 0).astype(np.float16)
        assert np.array_equal(s["hidden_states_0"], expected)
        assert s["hidden_states_2"].shape == (SEQ_LEN, 64) and np.all(s["hidden_states_2"][~mask] == 0)


def _brute_force_stats(sample: dict, k: int) -> dict:
    """A sample's statistics by FORMAT.md's definitions, one position at a time."""
    entropy, nll, tail, ranks = [], [], [], []
    for t in range(SEQ_LEN):
        if not sample["loss_mask"][t]:
            continue
        entropy.append(float(sample["entropy"][t]))
        nll.append(-float(sample["true_logprob"][t]))
        tail.append(math.exp(float(sample["tail_logmass"][t])))
        ids, logprobs = sample["topk_ids"][t].tolist(), sample["topk_logprobs"][t].astype(np.float32).tolist()
        true = int(sample["input_ids"][t + 1])
        ranks.append(1 + sum(lp > logprobs[ids.index(true)] for lp in logprobs) if true in ids else None)
    edges = [(1, 1)] + [(2 ** (b - 1) + 1, min(2 ** b, k)) for b in range(1, math.ceil(math.log2(k)) + 1)]
    histogram = [sum(r is not None and low <= r <= high for r in ranks) for low, high in edges]
    histogram.append(sum(r is None for r in ranks))
    mean = (lambda xs: sum(xs) / len(xs)) if ranks else (lambda xs: math.nan)
    return {"stats_num_tokens": len(ranks), "stats_entropy": mean(entropy), "stats_nll": mean(nll),
            "stats_tail_mass": mean(tail), "stats_true_rank": histogram}


def test_stored_statistics_equal_brute_force_over_the_stored_targets(reference):
    manifest, samples = read_with_zarr(reference)
    k = manifest["targets"]["topk"]["k"]
    seen_ranks = np.zeros(math.ceil(math.log2(k)) + 2, np.int64)
    for sample in samples:
        expected = _brute_force_stats(sample, k)
        assert sample["stats_num_tokens"] == expected["stats_num_tokens"] == sample["loss_mask"].sum()
        for name in ("stats_entropy", "stats_nll", "stats_tail_mass"):
            np.testing.assert_allclose(sample[name], expected[name], rtol=1e-5, err_msg=name)
        assert sample["stats_true_rank"].tolist() == expected["stats_true_rank"]
        seen_ranks += sample["stats_true_rank"]
    assert seen_ranks.sum() == manifest["totals"]["tokens"]


# The reference below recomputes the build's log-probs with other kernels (one unpadded sample through the model's own
# forward, against padded batches through the base model and the head): float32 noise of up to 7e-6 nat measured.
# Comparisons allow 1e-4 for it, far below a 1/64-nat step.
RECOMPUTE_NOISE = 1e-4


def test_topk_matches_brute_force_teacher(reference, llama_dir):
    """Stored top-k and true-token log-probs against torch.topk of the model's own full log-softmax."""
    _, samples = read_with_zarr(reference)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for i in (0, 17, 39):
        s = samples[i]
        ids = torch.from_numpy(s["input_ids"][:-1].astype(np.int64))[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].float(), -1)
        mask = torch.from_numpy(s["loss_mask"])
        torch.testing.assert_close(torch.from_numpy(s["hidden_states_2"].astype(np.float32))[mask],
                                   out.hidden_states[2][0][mask].half().float(), rtol=2e-3, atol=2e-3)
        top_logp, top_ids = logp.topk(TOP_K + 1, dim=-1)
        # The same ids (stored in ascending order) wherever the k-th and (k+1)-th are further apart than the noise.
        separated = mask & (top_logp[:, TOP_K - 1] - top_logp[:, TOP_K] > RECOMPUTE_NOISE)
        assert separated.sum() > 0.5 * mask.sum()
        stored_ids = torch.from_numpy(s["topk_ids"].astype(np.int64))
        assert torch.equal(stored_ids[separated], top_ids[:, :TOP_K].sort(-1).values[separated])
        # Steps of 1/64 nat: each within 1/128 of the build's value, so of the reference up to the noise.
        torch.testing.assert_close(torch.from_numpy(s["topk_logprobs"].astype(np.float32))[mask],
                                   logp.gather(-1, stored_ids)[mask], rtol=0, atol=1 / 128 + RECOMPUTE_NOISE)
        true_logp = logp.gather(1, torch.from_numpy(s["input_ids"][1:].astype(np.int64))[:, None])[:, 0]
        torch.testing.assert_close(torch.from_numpy(s["true_logprob"])[mask], true_logp[mask], rtol=1e-4, atol=1e-4)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(torch.from_numpy(s["entropy"])[mask], entropy[mask], rtol=1e-4, atol=1e-4)


def test_unpacked_store_holds_one_truncated_document_per_sample(tmp_path, llama_dir, dataset, documents):
    output = tmp_path / "store"
    build_cache(_config(llama_dir, dataset, output, pack=False, hidden_layers=()))
    manifest, samples = read_with_zarr(output)
    assert manifest["build"]["pack"] is False
    assert len(samples) == NUM_DOCS and [s["num_samples"] for s in manifest["shards"]] == [4] * 7 + [2]
    eos = 2  # the Llama-2 tokenizer has no pad token: padding is EOS
    for doc, s in zip(documents, samples, strict=True):
        real = min(len(doc), SEQ_LEN + 1)
        assert np.array_equal(s["input_ids"], doc[:real] + [eos] * (SEQ_LEN + 1 - real))
        assert np.array_equal(s["attention_mask"], np.arange(SEQ_LEN + 1) < real)
        assert np.array_equal(s["loss_mask"], np.arange(1, SEQ_LEN + 1) < real)
        assert not s["segment_ids"].any()
        assert [int(c.sum()) for _, c in s["sampled"]] == [NUM_DRAWS * int(m) for m in s["loss_mask"]]
        assert "hidden_states_0" not in s
    assert sum(int(s["loss_mask"].sum()) for s in samples) == sum(min(len(d), SEQ_LEN + 1) - 1 for d in documents)


def test_bytes_per_token_counts_the_files_on_disk(reference, documents):
    store = open_store(reference)
    tokens = sum(map(len, documents)) - 1
    per_array = {}
    for path in (reference / "shards").rglob("*"):
        parts = path.relative_to(reference / "shards").parts
        if path.is_file() and len(parts) > 2:  # shard-N/<array>/...
            # the floor and the excesses of version 3 are reported together, as the logical topk_logprobs
            name = "topk_logprobs" if parts[1] in ("topk_logprob_floor", "topk_logprob_excess") else parts[1]
            per_array[name] = per_array.get(name, 0) + path.stat().st_size
    bpt = store.bytes_per_token()
    assert set(bpt) == ARRAY_NAMES | STATS | {"total"}
    for name, size in per_array.items():
        assert bpt[name] == pytest.approx(size / tokens)
    assert bpt["total"] == pytest.approx(sum(per_array.values()) / tokens)


# --- verify -------------------------------------------------------------------------------------------------------


def test_verify_reports_corrupted_missing_and_extra_files(tmp_path, reference):
    root = tmp_path / "store"
    shutil.copytree(reference, root)
    assert open_store(root).verify() == []

    shard3 = root / "shards" / "shard-000003"
    victim = max((p for p in shard3.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, str(p)))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    corrupted = f"shards/shard-000003/{victim.relative_to(shard3).as_posix()}"
    assert open_store(root).verify() == [f"{corrupted}: checksum mismatch"]

    deleted = root / "shards" / "shard-000005" / "entropy" / "zarr.json"
    deleted.unlink()
    (root / "shards" / "shard-000006" / "stray.bin").write_bytes(b"x")
    shutil.rmtree(root / "shards" / "shard-000008")
    assert open_store(root).verify() == [
        f"{corrupted}: checksum mismatch",
        "shards/shard-000005/entropy/zarr.json: missing",
        "shards/shard-000006/stray.bin: not in the manifest",
        "shards/shard-000008: missing",
    ]


# --- export -------------------------------------------------------------------------------------------------------


def test_parquet_export_rows_equal_store_samples(tmp_path, reference):
    import pyarrow.parquet as pq

    store = open_store(reference)
    path = tmp_path / "store.parquet"
    assert export_parquet(store, path) == 40
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_rows == 40
    assert parquet.metadata.num_row_groups == 10  # one per shard
    table = parquet.read()
    assert set(table.column_names) == (ARRAY_NAMES - {"sampled_offsets"}) | STATS | {"sample_index"}
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    assert columns["sample_index"] == list(range(40))
    stats = store.stats()
    for name in STATS:
        assert np.array_equal(np.asarray(columns[name], dtype=stats[name].dtype), stats[name], equal_nan=True), name
    for i in range(40):
        sample = store[i]
        for name in ARRAY_NAMES - set(FLAT):
            row = np.asarray(columns[name][i], dtype=sample[name].dtype)
            assert np.array_equal(row, sample[name]), (i, name)
        per_position = columns["sampled_ids"][i]
        assert len(per_position) == SEQ_LEN
        assert [len(p) for p in per_position] == sample["sampled_nunique"].tolist()
        assert np.array_equal(np.asarray([x for p in per_position for x in p], dtype=np.uint16), sample["sampled_ids"])
        counts = columns["sampled_counts"][i]
        assert [len(p) for p in counts] == [len(p) for p in per_position]
        assert np.array_equal(np.asarray([x for p in counts for x in p], dtype=np.uint8), sample["sampled_counts"])
        assert [sum(p) for p in counts] == [NUM_DRAWS * int(m) for m in sample["loss_mask"]]


# --- fsspec URLs --------------------------------------------------------------------------------------------------


def test_build_to_file_url_reads_back(tmp_path, llama_dir, dataset, reference):
    url = f"file://{tmp_path}/store"
    manifest = build_cache(_config(llama_dir, dataset, url, max_samples=6))
    assert manifest.complete and manifest.num_samples == 6
    assert (tmp_path / "store" / "manifest.json").is_file()
    for location in (url, tmp_path / "store"):
        store = open_store(location)
        assert [s.num_samples for s in store.manifest.shards] == [4, 2]
        assert_same_samples(store, open_store(reference), count=6)
        assert store.verify() == []


def test_build_to_memory_url_reads_back(llama_dir, dataset, reference):
    import fsspec

    try:
        from zarr.storage import FsspecStore

        FsspecStore.from_url(f"memory://probe-{uuid.uuid4().hex}", read_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means this zarr/fsspec pair cannot use memory://
        pytest.skip(f"zarr's FsspecStore cannot open memory:// URLs here: {exc}")
    url = f"memory://store-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        build_cache(_config(llama_dir, dataset, url, max_samples=6))
        store = open_store(url)
        assert len(store) == 6 and store.manifest.complete
        assert_same_samples(store, open_store(reference), count=6)
        assert store.verify() == []
        assert json.loads(fs.cat_file(f"{url.removeprefix('memory://')}/manifest.json"))["totals"]["samples"] == 6
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)


# --- random access ------------------------------------------------------------------------------------------------


def test_random_access_matches_shard_reads(reference):
    store = open_store(reference)
    n = len(store)
    assert n == 40
    global_index = 0
    for shard in store.shards:
        data = shard.read()
        offsets = data["sampled_offsets"].astype(np.int64)
        for row in range(len(shard)):
            sample = store[global_index]
            for name in ARRAY_NAMES - set(FLAT):
                assert np.array_equal(sample[name], data[name][row]), (global_index, name)
            entries = slice(offsets[row], offsets[row + 1])
            assert np.array_equal(sample["sampled_ids"], data["sampled_ids"][entries])
            assert np.array_equal(sample["sampled_counts"], data["sampled_counts"][entries])
            assert int(sample["sampled_nunique"].sum()) == offsets[row + 1] - offsets[row]
            global_index += 1
    assert global_index == n

    # A row slice of a shard covers exactly those rows' entries, with offsets rebased to 0.
    shard = store.shards[2]
    full, part = shard.read(), shard.read(slice(1, 3))
    offsets = full["sampled_offsets"].astype(np.int64)
    assert np.array_equal(part["sampled_offsets"], offsets[1:4] - offsets[1])
    assert np.array_equal(part["sampled_ids"], full["sampled_ids"][offsets[1]:offsets[3]])
    assert np.array_equal(part["topk_ids"], full["topk_ids"][1:3])

    for negative in (-1, -5, -n):
        for name, value in store[negative].items():
            assert np.array_equal(value, store[n + negative][name])
    for bad in (n, n + 3, -n - 1):
        with pytest.raises(IndexError, match=str(bad)):
            store[bad]


def test_arrays_larger_than_an_inner_chunk_round_trip(tmp_path):
    """Arrays spanning several ~1 MiB inner chunks, with lengths that are no multiple of a chunk, read back."""
    from storage.layout import TARGET_CHUNK_BYTES
    from storage.manifest import Manifest
    from storage.targets import array_specs

    rng = np.random.default_rng(0)
    S, L, K, N = 7, 2000, 80, 250  # topk_ids: 7 x 2000 x 80 x 2 bytes, several chunks; rows not a chunk multiple
    nunique = rng.integers(1, N, size=(S, L)).astype(np.uint8)
    E = int(nunique.sum(dtype=np.int64))
    assert E * 2 > 2 * TARGET_CHUNK_BYTES  # the flat ids span at least three inner chunks
    record = {
        "input_ids": rng.integers(0, 32000, size=(S, L + 1)).astype(np.uint16),
        "attention_mask": np.ones((S, L + 1), bool),
        "loss_mask": np.ones((S, L), bool),
        "segment_ids": np.zeros((S, L + 1), np.uint16),
        "entropy": rng.random((S, L), dtype=np.float32),
        "true_logprob": -rng.random((S, L), dtype=np.float32),
        "topk_ids": rng.integers(0, 32000, size=(S, L, K)).astype(np.uint16),
        "topk_logprobs": -rng.random((S, L, K)).astype(np.float16),
        "tail_logmass": -rng.random((S, L), dtype=np.float32),
        "sampled_nunique": nunique,
        "sampled_ids": rng.integers(0, 32000, size=E).astype(np.uint16),
        "sampled_counts": rng.integers(1, N, size=E).astype(np.uint8),
    }
    targets = {"topk": {"k": K}, "sampled": {"num_draws": N}}
    stored = set(record) - {"topk_logprobs"} | {"topk_logprob_floor", "topk_logprob_excess"}
    assert set(array_specs(vocab_size=32000, targets=targets)) == stored | {"sampled_offsets"} | STATS
    manifest = Manifest(teacher={"vocab_size": 32000}, dataset={}, build={}, targets=targets)
    writer = StoreWriter.open(tmp_path / "store", manifest, resume=False)
    writer.write_shard(0, record)
    writer.finish()
    shard = open_store(tmp_path / "store").shards[0].read()
    for name, expected in record.items():
        if name in ("topk_logprobs", "tail_logmass"):  # the nearest multiple of 1/64 nat (FORMAT.md)
            expected = np.round(expected.astype(np.float64) * 64) / 64
        np.testing.assert_array_equal(shard[name], expected, err_msg=name)
    np.testing.assert_array_equal(shard["sampled_offsets"], np.concatenate([[0], np.cumsum(nunique.sum(1))]))
