"""`teacher-cache inspect` against brute force: every figure recomputed here from the stored targets.

The store is built by `build_cache` from a tiny Llama trained for a few steps on the same text (a random teacher
never ranks the true token in its top-k, which would leave the rank distribution trivial). The per-sample means,
ranks, quantiles and shares are recomputed in torch from each sample's arrays, the bytes per token from the files
on disk; the statistics arrays are not read here. A version 1 store (no statistics) and a store of sampled
targets only are written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_llama, make_small_store
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage import StoreWriter
from storage.inspection import QUANTILES, SHARD_LINES, inspect_store
from storage.manifest import Manifest
from storage.reader import open_store
from storage.stats import rank_bin_labels
from teacher_cache.cli import main

SEQ_LEN = 32
TOP_K = 8
SAMPLES_PER_SHARD = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    return corpus_texts[:40]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, texts) -> Path:
    """A tiny Llama trained for 8 steps: it has learned the frequent tokens, so its top-k often holds the true one."""
    path = make_llama(tmp_path_factory.mktemp("inspect-teacher"))
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor(sum(AutoTokenizer.from_pretrained(path)(texts)["input_ids"], []))
    rows = ids[:len(ids) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)
    with torch.no_grad():
        model.lm_head.weight.div_(40.0)  # undo make_llama's sharpening, which makes the first steps slow
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        batch = rows[torch.randint(len(rows), (8,), generator=generator)]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher, texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("inspect-store"), teacher, texts,
                            samples_per_shard=SAMPLES_PER_SHARD, top_k=TOP_K)


@pytest.fixture(scope="module")
def truth(store) -> dict:
    """Per-sample values, the rank histogram and counts, from every sample's stored targets (float64 torch)."""
    store = open_store(store)
    values = {key: [] for key in ("entropy", "nll", "tail_mass", "top1", "tokens")}
    per_token = {key: [] for key in ("entropy", "nll", "tail_mass", "top1")}
    rank_counts = [0] * len(rank_bin_labels(TOP_K))
    positions = 0
    for i in range(len(store)):
        sample = {k: torch.from_numpy(np.asarray(v).astype(np.float64)) for k, v in store[i].items()
                  if k in ("input_ids", "loss_mask", "entropy", "true_logprob", "tail_logmass", "topk_ids",
                           "topk_logprobs")}
        mask = sample["loss_mask"].bool()
        positions += mask.numel()
        true = sample["input_ids"][1:]
        hit = sample["topk_ids"] == true[:, None]                              # [L, K]
        true_lp = torch.where(hit, sample["topk_logprobs"], -torch.inf).amax(-1)
        rank = (sample["topk_logprobs"] > true_lp[:, None]).sum(-1) + 1
        inside = hit.any(-1)
        for t in torch.nonzero(mask).flatten().tolist():
            r = int(rank[t])
            rank_counts[-1 if not inside[t] else (0 if r == 1 else math.ceil(math.log2(r)))] += 1
        token_values = {"entropy": sample["entropy"][mask], "nll": -sample["true_logprob"][mask],
                        "tail_mass": sample["tail_logmass"][mask].exp(),
                        "top1": (inside & (rank == 1))[mask].double()}
        for key, v in token_values.items():
            per_token[key].append(v)
            values[key].append(v.mean().item() if len(v) else math.nan)
        values["tokens"].append(float(mask.sum()))
    return {"values": {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()},
            "per_token": {k: torch.cat(v) for k, v in per_token.items()}, "rank_counts": rank_counts,
            "positions": positions, "samples": len(store)}


def _stored_bytes(path: Path) -> dict[str, int]:
    """Bytes of every array's files on disk, summed over the shards."""
    sizes: dict[str, int] = {}
    for file in (path / "shards").glob("shard-*/*/**/*"):
        if file.is_file():
            name = file.relative_to(path / "shards").parts[1]
            # a version 3 shard's top-k log-prob floor and excesses are reported as the logical topk_logprobs
            name = "topk_logprobs" if name in ("topk_logprob_floor", "topk_logprob_excess") else name
            sizes[name] = sizes.get(name, 0) + file.stat().st_size
    return sizes


def test_inspect_equals_brute_force_from_the_targets(store, truth):
    report = inspect_store(open_store(store)).report
    tokens = int(truth["values"]["tokens"].sum())
    assert (report["samples"], report["tokens"], report["positions"]) == (truth["samples"], tokens,
                                                                          truth["positions"])
    assert report["shards"] == math.ceil(truth["samples"] / SAMPLES_PER_SHARD)
    assert report["stats_source"] == "stored" and report["note"] is None
    for key, dist in report["distributions"].items():
        values = truth["values"][key]
        finite = values[~values.isnan()]
        assert dist["samples"] == len(finite)
        want = torch.quantile(finite, torch.tensor(list(QUANTILES.values()), dtype=torch.float64)).tolist()
        assert list(dist["quantiles"]) == list(QUANTILES)
        assert list(dist["quantiles"].values()) == pytest.approx(want, rel=1e-5, abs=1e-7), key
        assert dist["mean_per_sample"] == pytest.approx(finite.mean().item(), rel=1e-5), key
        if key != "tokens":  # the store-wide mean over trained positions
            assert dist["mean_per_token"] == pytest.approx(truth["per_token"][key].mean().item(), rel=1e-5), key
    rank = report["true_rank"]
    assert [b["rank"] for b in rank["bins"]] == rank_bin_labels(TOP_K)
    assert [b["tokens"] for b in rank["bins"]] == truth["rank_counts"]
    assert rank["top1_agreement"] == pytest.approx(truth["rank_counts"][0] / tokens)
    assert rank["in_topk"] == pytest.approx(1 - truth["rank_counts"][-1] / tokens)
    assert 0.05 < rank["top1_agreement"] < rank["in_topk"] < 1  # the trained teacher makes every bin count
    sizes = _stored_bytes(store)
    bytes_per_token = report["bytes_per_token"]
    for name, size in sizes.items():
        assert bytes_per_token[name] == pytest.approx(size / tokens), name
    assert bytes_per_token["total"] == pytest.approx(sum(sizes.values()) / tokens)


def test_per_shard_figures(store, truth):
    report = inspect_store(open_store(store)).report
    starts = range(0, truth["samples"], SAMPLES_PER_SHARD)
    assert [row["samples"] for row in report["per_shard"]] == [min(SAMPLES_PER_SHARD, truth["samples"] - s)
                                                                for s in starts]
    for row, start in zip(report["per_shard"], starts, strict=True):
        tokens = truth["values"]["tokens"][start:start + SAMPLES_PER_SHARD]
        assert row["tokens"] == int(tokens.sum()) and row["positions"] == len(tokens) * SEQ_LEN
        for key in ("entropy", "nll", "tail_mass", "top1"):
            values = truth["values"][key][start:start + SAMPLES_PER_SHARD]
            want = (values * tokens).nansum() / tokens.sum()
            assert row["mean_per_token"][key] == pytest.approx(want.item(), rel=1e-5), (row["name"], key)
        shard_dir = store / row["name"]
        arrays = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                  for d in shard_dir.iterdir() if d.is_dir()}
        assert row["array_bytes_per_token"] == pytest.approx({k: v / row["tokens"] for k, v in arrays.items()})
        assert row["bytes_per_token"] == pytest.approx(sum(arrays.values()) / row["tokens"])


def test_cli_prints_tables_json_and_a_png(store, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "inspect.png"
    result = runner.invoke(main, ["inspect", str(store), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = inspect_store(open_store(store)).report
    rank = report["true_rank"]
    assert f"{report['samples']:,} in {report['shards']} shards" in result.output
    assert f"top-1 agreement {100 * rank['top1_agreement']:.1f}%, in the top-{TOP_K} {100 * rank['in_topk']:.1f}%" \
        in result.output
    for key in ("entropy", "nll", "tail_mass", "top1", "tokens"):
        assert any(line.split()[:1] == [key] for line in result.output.splitlines()), key
    # More shards than SHARD_LINES: summarised by default, every one listed with --shards.
    assert report["shards"] > SHARD_LINES
    assert "--shards lists each" in result.output and "shard-000000" not in result.output
    listed = runner.invoke(main, ["inspect", str(store), "--shards"])
    assert all(row["name"] in listed.output for row in report["per_shard"])
    data = plot.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 400  # one figure of 2 x 3 panels

    as_json = runner.invoke(main, ["inspect", str(store), "--json"])
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.output)
    assert parsed["samples"] == report["samples"] and len(parsed["per_shard"]) == report["shards"]
    assert parsed["distributions"]["entropy"]["quantiles"] == pytest.approx(
        report["distributions"]["entropy"]["quantiles"])


def test_cli_refuses_a_missing_store(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "manifest.json" in result.output


# --- hand-made stores: version 1, sampled targets only --------------------------------------------------------------


def _record(rng: np.random.Generator, samples: int, length: int, k: int) -> dict[str, np.ndarray]:
    topk_ids = np.sort(np.stack([rng.choice(20, size=k, replace=False) for _ in range(samples * length)]), -1)
    loss_mask = rng.random((samples, length)) < 0.8
    loss_mask[1] = False  # a sample without trained tokens: NaN statistics
    return {
        "input_ids": rng.integers(0, 20, (samples, length + 1)).astype(np.uint16),
        "attention_mask": np.ones((samples, length + 1), bool), "loss_mask": loss_mask,
        "segment_ids": np.zeros((samples, length + 1), np.uint16),
        "entropy": rng.random((samples, length), dtype=np.float32) * 3,
        "true_logprob": -rng.random((samples, length), dtype=np.float32) * 5,
        "topk_ids": topk_ids.reshape(samples, length, k).astype(np.uint16),
        "topk_logprobs": (-rng.random((samples, length, k)) * 4).astype(np.float16),
        "tail_logmass": np.log(rng.random((samples, length)) * 0.5).astype(np.float32),
    }


def _write(path: Path, record: dict, targets: dict, version: int) -> Path:
    """A store of two shards (samples 0-2 and 3-), flat sampled entries split with their samples."""
    manifest = Manifest(teacher={"vocab_size": 32000}, dataset={}, build={"seq_len": 6}, targets=targets,
                        format_version=version)
    writer = StoreWriter.open(path, manifest, resume=False)
    entries = int(record["sampled_nunique"][:3].sum()) if "sampled_nunique" in record else 0
    for index, (rows, flat) in enumerate([(slice(0, 3), slice(0, entries)), (slice(3, None), slice(entries, None))]):
        writer.write_shard(index, {k: v[flat] if k in ("sampled_ids", "sampled_counts") else v[rows]
                                   for k, v in record.items()})
    writer.finish()
    return path


def _expected(record: dict, k: int) -> dict:
    """Per-sample values and rank counts of a hand-made record, position by position in plain Python."""
    values = {"entropy": [], "nll": [], "tail_mass": [], "top1": []}
    counts = [0] * len(rank_bin_labels(k))
    for s, mask in enumerate(record["loss_mask"]):
        per = {key: [] for key in values}
        for t in np.flatnonzero(mask):
            ids, lps = record["topk_ids"][s, t].tolist(), record["topk_logprobs"][s, t].astype(float).tolist()
            true = int(record["input_ids"][s, t + 1])
            rank = 1 + sum(lp > lps[ids.index(true)] for lp in lps) if true in ids else None
            counts[-1 if rank is None else (0 if rank == 1 else math.ceil(math.log2(rank)))] += 1
            per["entropy"].append(float(record["entropy"][s, t]))
            per["nll"].append(-float(record["true_logprob"][s, t]))
            per["tail_mass"].append(math.exp(float(record["tail_logmass"][s, t])))
            per["top1"].append(float(rank == 1))
        for key in values:
            values[key].append(sum(per[key]) / len(per[key]) if per[key] else math.nan)
    return {"values": values, "rank_counts": counts}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the order statistics around (n - 1) * q."""
    h = (len(ordered) - 1) * q
    low = math.floor(h)
    return ordered[low] + (h - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])


def test_version_1_store_is_inspected_from_its_targets_and_says_so(tmp_path):
    record = _record(np.random.default_rng(0), samples=7, length=6, k=4)
    path = _write(tmp_path / "v1", record, {"topk": {"k": 4}}, version=1)  # stores these values exactly
    report = inspect_store(open_store(path)).report
    assert report["stats_source"] == "computed from targets"
    assert "version 1" in report["note"] and "slower" in report["note"]
    expected = _expected(record, k=4)
    assert report["samples_without_tokens"] == 1
    for key, values in expected["values"].items():
        finite = [v for v in values if not math.isnan(v)]
        dist = report["distributions"][key]
        assert dist["samples"] == len(finite) == 6
        want = [_quantile(sorted(finite), q) for q in QUANTILES.values()]
        assert list(dist["quantiles"].values()) == pytest.approx(want, rel=1e-6), key
        assert dist["mean_per_sample"] == pytest.approx(sum(finite) / len(finite), rel=1e-6)
    assert [b["tokens"] for b in report["true_rank"]["bins"]] == expected["rank_counts"]
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "statistics computed from the targets (format version 1" in result.output
    assert "slower: decoding" in result.output


def test_sampled_only_store_has_no_tail_or_rank(tmp_path):
    rng = np.random.default_rng(1)
    record = {k: v for k, v in _record(rng, samples=5, length=6, k=2).items()
              if k not in ("topk_ids", "topk_logprobs", "tail_logmass")}
    nunique = np.where(record["loss_mask"], 2, 0).astype(np.uint8)
    pairs = int(nunique.sum()) // 2
    record |= {"sampled_nunique": nunique, "sampled_ids": np.tile([3, 9], pairs).astype(np.uint16),
               "sampled_counts": np.tile([3, 1], pairs).astype(np.uint8)}
    path = _write(tmp_path / "sampled", record, {"sampled": {"num_draws": 4}}, version=2)
    report = inspect_store(open_store(path)).report
    assert set(report["distributions"]) == {"entropy", "nll", "tokens"} and report["true_rank"] is None
    plot = tmp_path / "sampled.png"
    result = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "true-token rank" not in result.output and plot.read_bytes()[:8] == PNG_SIGNATURE
