"""Per-sample statistics (format version 2): hand-made cases, brute force on random records, version 1 stores.

The statistics of a real build are checked against the stored targets in test_store.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import StoreWriter
from storage.manifest import Manifest
from storage.reader import open_store
from storage.stats import rank_bin_labels, rank_bins
from storage.targets import sample_stats


def _record(input_ids, loss_mask, topk_ids, topk_logprobs, entropy=None, true_logprob=None, tail_logmass=None):
    S, L, K = np.shape(topk_ids)
    rng = np.random.default_rng(1)
    return {
        "input_ids": np.asarray(input_ids, np.uint16),
        "attention_mask": np.ones((S, L + 1), bool),
        "loss_mask": np.asarray(loss_mask, bool),
        "segment_ids": np.zeros((S, L + 1), np.uint16),
        "entropy": rng.random((S, L), dtype=np.float32) if entropy is None else np.asarray(entropy, np.float32),
        "true_logprob": (-rng.random((S, L), dtype=np.float32) if true_logprob is None
                         else np.asarray(true_logprob, np.float32)),
        "topk_ids": np.asarray(topk_ids, np.uint16),
        "topk_logprobs": np.asarray(topk_logprobs, np.float16),
        "tail_logmass": (np.log(rng.random((S, L)) * 0.5).astype(np.float32) if tail_logmass is None
                         else np.asarray(tail_logmass, np.float32)),
    }


def test_rank_bins_follow_powers_of_two():
    assert rank_bin_labels(64) == ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", ">64"]
    assert rank_bin_labels(5) == ["1", "2", "3-4", "5", ">5"]
    assert rank_bin_labels(50)[-2:] == ["33-50", ">50"]
    assert rank_bin_labels(1) == ["1", ">1"]
    assert [rank_bins(k) for k in (1, 2, 3, 4, 5, 8, 9)] == [2, 3, 4, 4, 5, 5, 6]


def test_hand_made_sample_statistics():
    # One sample, 4 positions, k = 5 (bins 1 | 2 | 3-4 | 5 | >5). Ids ascending; log-probs set the ranks.
    topk_ids = [[[3, 5, 7, 9, 11]] * 4]
    topk_logprobs = [[[-1.0, -2.0, -3.0, -4.0, -5.0],   # true 3: rank 1
                      [-1.0, -2.0, -3.0, -4.0, -5.0],   # true 11: rank 5
                      [-3.0, -1.0, -2.0, -2.0, -4.0],   # true 9: only id 5 is above; id 7 ties -> rank 2
                      [-1.0, -2.0, -3.0, -4.0, -5.0]]]  # true 4: not in the top-k
    input_ids = [[0, 3, 11, 9, 4]]
    loss_mask = [[True, True, True, True]]
    entropy = [[1.0, 2.0, 3.0, 6.0]]
    true_logprob = [[-1.0, -5.0, -2.0, -7.0]]
    tail_logmass = np.log([[0.1, 0.2, 0.3, 0.4]])
    stats = sample_stats(_record(input_ids, loss_mask, topk_ids, topk_logprobs, entropy, true_logprob, tail_logmass),
                         {"topk": {"k": 5}})
    assert stats["stats_num_tokens"].tolist() == [4]
    assert stats["stats_entropy"][0] == pytest.approx(3.0)
    assert stats["stats_nll"][0] == pytest.approx(15 / 4)
    assert stats["stats_tail_mass"][0] == pytest.approx(0.25)
    assert stats["stats_true_rank"].tolist() == [[1, 1, 0, 1, 1]]

    # Masked positions do not count; a sample with none has NaN means and an empty histogram.
    masked = _record([[0, 3, 11, 9, 4]] * 2, [[False, True, False, True], [False] * 4], topk_ids * 2,
                     topk_logprobs * 2, [[1.0, 2.0, 3.0, 6.0]] * 2, [[-1.0, -5.0, -2.0, -7.0]] * 2,
                     np.log([[0.1, 0.2, 0.3, 0.4]] * 2))
    stats = sample_stats(masked, {"topk": {"k": 5}})
    assert stats["stats_num_tokens"].tolist() == [2, 0]
    assert stats["stats_entropy"][0] == pytest.approx(4.0) and math.isnan(stats["stats_entropy"][1])
    assert stats["stats_nll"][0] == pytest.approx(6.0) and math.isnan(stats["stats_nll"][1])
    assert stats["stats_tail_mass"][0] == pytest.approx(0.3)
    assert stats["stats_true_rank"].tolist() == [[0, 0, 0, 1, 1], [0] * 5]  # positions 1 (rank 5) and 3 (outside)
    # Without top-k targets there is no tail or rank.
    assert set(sample_stats(masked, {"sampled": {"num_draws": 4}})) == {"stats_num_tokens", "stats_entropy",
                                                                       "stats_nll"}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 9), vocab=st.integers(10, 14))
def test_statistics_equal_brute_force_on_random_records(seed, k, vocab):
    rng = np.random.default_rng(seed)
    S, L = 3, 6
    topk_ids = np.sort(np.stack([[rng.choice(vocab, size=k, replace=False) for _ in range(L)] for _ in range(S)]), -1)
    logprobs = -rng.integers(0, 4, size=(S, L, k)).astype(np.float16)  # few values: ties are common
    record = _record(rng.integers(0, vocab, size=(S, L + 1)), rng.random((S, L)) < 0.7, topk_ids, logprobs)
    stats = sample_stats(record, {"topk": {"k": k}})
    for s in range(S):
        ranks = []
        for t in range(L):
            if record["loss_mask"][s, t]:
                true = int(record["input_ids"][s, t + 1])
                ids = record["topk_ids"][s, t].tolist()
                lps = record["topk_logprobs"][s, t].tolist()
                ranks.append(1 + sum(lp > lps[ids.index(true)] for lp in lps) if true in ids else None)
        bins = [0] * rank_bins(k)
        for r in ranks:
            bins[-1 if r is None else (0 if r == 1 else math.ceil(math.log2(r)))] += 1
        assert stats["stats_true_rank"][s].tolist() == bins
        assert stats["stats_num_tokens"][s] == len(ranks)
        if ranks:
            mask = record["loss_mask"][s]
            assert stats["stats_tail_mass"][s] == pytest.approx(np.exp(record["tail_logmass"][s][mask]).mean(),
                                                                rel=1e-5)


def _write(path, record, targets, version):
    manifest = Manifest(teacher={"vocab_size": 32000}, dataset={}, build={"seq_len": 4}, targets=targets,
                        format_version=version)
    writer = StoreWriter.open(path, manifest, resume=False)
    writer.write_shard(0, {k: v[:1] for k, v in record.items()})
    writer.write_shard(1, {k: v[1:] for k, v in record.items()})
    writer.finish()
    return open_store(path)


def test_version_1_store_reads_with_statistics_computed_from_its_targets(tmp_path):
    rng = np.random.default_rng(0)
    S, L, K = 3, 4, 5
    topk_ids = np.sort(np.stack([[rng.choice(20, size=K, replace=False) for _ in range(L)] for _ in range(S)]), -1)
    # Log-probs that both versions store exactly (multiples of 1/64 nat, small enough for fp16).
    record = _record(rng.integers(0, 20, size=(S, L + 1)), rng.random((S, L)) < 0.8, topk_ids,
                     -rng.integers(0, 256, size=(S, L, K)) / 64, tail_logmass=-rng.integers(1, 256, size=(S, L)) / 64)
    targets = {"topk": {"k": K}}
    v1, v2 = _write(tmp_path / "v1", record, targets, 1), _write(tmp_path / "v2", record, targets, 2)
    v3 = _write(tmp_path / "v3", record, targets, 3)
    assert [v.manifest.format_version for v in (v1, v2, v3)] == [1, 2, 3]
    assert not list((tmp_path / "v1").rglob("stats_*")) and list((tmp_path / "v2").rglob("stats_*"))
    assert v1.verify() == [] == v2.verify() == v3.verify()
    want = sample_stats(record, targets)
    for store in (v1, v2, v3):
        got = store.stats()
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        for i in range(S):  # the samples themselves are the same in every version
            assert set(store[i]) == set(v2[i])
            for name, value in v2[i].items():
                np.testing.assert_array_equal(store[i][name], value, err_msg=name)


def test_resuming_a_version_1_build_is_refused_and_leaves_it_readable(tmp_path):
    rng = np.random.default_rng(0)
    S, L, K = 2, 4, 3
    topk_ids = np.sort(np.stack([[rng.choice(20, size=K, replace=False) for _ in range(L)] for _ in range(S)]), -1)
    record = _record(rng.integers(0, 20, size=(S, L + 1)), np.ones((S, L), bool), topk_ids, -rng.random((S, L, K)))
    manifest = Manifest(teacher={"vocab_size": 32000}, dataset={}, build={"seq_len": 4}, targets={"topk": {"k": K}},
                        format_version=1)
    StoreWriter.open(tmp_path / "v1", manifest, resume=False).write_shard(0, record)  # interrupted: not finished
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "v1").rglob("*") if p.is_file())
    fresh = Manifest(teacher={"vocab_size": 32000}, dataset={}, build={"seq_len": 4}, targets={"topk": {"k": K}})
    with pytest.raises(ValueError, match="format version 1.*writes version 4.*new --output"):
        StoreWriter.open(tmp_path / "v1", fresh, resume=True)
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "v1").rglob("*") if p.is_file())
    assert after == before
    assert len(open_store(tmp_path / "v1", allow_incomplete=True)) == S

