"""The phase-2 loader on a small store with uneven shards (41 samples: ten shards of 4 and one of 1).

Coverage and determinism are checked across 0 and 2 workers (real DataLoader workers), 1 and 2 simulated ranks
and both drop_last settings; resume is an equivalence test (stop, JSON round trip of the state, rebuild with
another worker count, and the next batches equal an uninterrupted run's); collated tensors are checked against
the store's own per-sample arrays (`Store[i]`), read independently of the loader.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from storage import ShardReader, open_store
from student_train.loader import LoaderConfig, StoreLoader
from teacher_cache import BuildConfig, build_cache

NUM_SAMPLES = 41
SAMPLES_PER_SHARD = 4
SHARD_SIZES = [4] * 10 + [1]
SEQ_LEN = 16
TOP_K = 4
NUM_DRAWS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_jsonl) -> str:
    output = tmp_path_factory.mktemp("loader") / "store"
    build_cache(BuildConfig(model=str(llama_dir), dataset=str(corpus_jsonl), output=str(output), seq_len=SEQ_LEN,
                            max_samples=NUM_SAMPLES, samples_per_shard=SAMPLES_PER_SHARD, batch_size=4, top_k=TOP_K,
                            num_draws=NUM_DRAWS, hidden_layers=(0,), device="cpu", dtype="float32"))
    assert [s.num_samples for s in open_store(output).manifest.shards] == SHARD_SIZES
    return str(output)


def _loader(store: str, rank: int = 0, world_size: int = 1, **options) -> StoreLoader:
    return StoreLoader(LoaderConfig(store=store, **{"batch_size": 3, **options}), rank=rank, world_size=world_size)


def _epoch_ids(loader: StoreLoader) -> list[list[int]]:
    return [batch["sample_ids"].tolist() for batch in loader]


def _full_order(store: str, epoch: int = 0, **options) -> list[int]:
    """An epoch's whole order: one rank, batches of one, nothing dropped."""
    loader = _loader(store, batch_size=1, drop_last=False, **options)
    loader.set_epoch(epoch)
    return [i for b in _epoch_ids(loader) for i in b]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# --- partition and order ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_sample_once_per_epoch_across_ranks(store, num_workers, world_size, drop_last):
    batch_size = 4
    step = world_size * batch_size
    for epoch in (0, 1):
        full_order = _full_order(store, epoch, seed=3)
        assert sorted(full_order) == list(range(NUM_SAMPLES))
        per_rank = []
        for rank in range(world_size):
            loader = _loader(store, rank, world_size, batch_size=batch_size, drop_last=drop_last, seed=3,
                             num_workers=num_workers)
            loader.set_epoch(epoch)
            per_rank.append(_epoch_ids(loader))
            assert len(per_rank[-1]) == len(loader)
        # Documented partition: full steps of world_size * batch_size, then (without drop_last) one short batch of
        # the same size on every rank; the remainder is dropped.
        full_steps, rest = divmod(NUM_SAMPLES, step)
        short = 0 if drop_last else rest // world_size
        for batches in per_rank:
            assert [len(b) for b in batches] == [batch_size] * full_steps + ([short] if short else [])
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen)) == NUM_SAMPLES - (rest if drop_last else rest % world_size)
        # Step b of all ranks, in rank order, is the b-th block of the epoch's order; the dropped rest is its tail.
        interleaved = [i for step_batches in zip(*per_rank, strict=True) for b in step_batches for i in b]
        assert interleaved == full_order[:len(seen)]
        assert sorted(seen + full_order[len(seen):]) == list(range(NUM_SAMPLES))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_dataloader_over_the_dataset_gives_the_same_batches_with_any_worker_count(store):
    loader = _loader(store, rank=1, world_size=2, batch_size=2, drop_last=False)
    expected = list(loader)
    for workers in (1, 3):
        got = list(DataLoader(_loader(store, rank=1, world_size=2, batch_size=2, drop_last=False).dataset(),
                              batch_size=None, num_workers=workers))
        _assert_same_batches(got, expected)


def test_order_is_a_function_of_seed_and_epoch(store):
    a, b = _loader(store, seed=5), _loader(store, seed=5)
    epoch0 = _epoch_ids(a)
    assert _epoch_ids(b) == epoch0
    epoch1 = _epoch_ids(a)  # an exhausted epoch is followed by the next one
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) != sum(epoch1, [])
    fresh = _loader(store, seed=5)
    fresh.set_epoch(1)
    assert _epoch_ids(fresh) == epoch1 == _epoch_ids(b)
    assert _epoch_ids(_loader(store, seed=6)) != epoch0
    assert _full_order(store, shuffle=False) == list(range(NUM_SAMPLES))
    natural = _epoch_ids(_loader(store, shuffle=False, batch_size=4, drop_last=False))
    assert natural == [list(range(i, min(i + 4, NUM_SAMPLES))) for i in range(0, NUM_SAMPLES, 4)]


def _windows(order: list[int], window: int) -> list[set[int]]:
    """Split an order into consecutive runs that each hold every sample of at most `window` shards.

    Fails when a run would need a shard beyond `window` before its shards' samples are all used, i.e. when a
    sample comes from outside the shards of its shuffle window.
    """
    starts = np.cumsum([0, *SHARD_SIZES])
    shard_of = np.searchsorted(starts, order, side="right") - 1
    runs, position = [], 0
    while position < len(order):
        shards, count = set(), 0
        while position < len(order) and (shard_of[position] in shards or len(shards) < window):
            shards.add(int(shard_of[position]))
            count, position = count + 1, position + 1
        assert count == sum(SHARD_SIZES[j] for j in shards), (runs, shards, count)
        assert len(shards) == window or position == len(order)
        runs.append(shards)
    return runs


@pytest.mark.parametrize("window", [1, 3])
def test_samples_are_shuffled_within_windows_of_shards(store, window):
    shard_groups = []
    for seed in range(3):
        for epoch in range(2):
            order = _full_order(store, epoch, seed=seed, shuffle_window=window)
            runs = _windows(order, window)
            assert sorted(j for run in runs for j in run) == list(range(len(SHARD_SIZES)))
            shard_groups.append(runs)
            assert order != sorted(order)
    natural = [set(range(i, min(i + window, len(SHARD_SIZES)))) for i in range(0, len(SHARD_SIZES), window)]
    assert any(groups != natural for groups in shard_groups)  # the shards themselves are permuted
    assert len({str(groups) for groups in shard_groups}) > 1
    with pytest.raises(AssertionError):  # the check itself catches a window of 2 when 1 was promised
        _windows(_full_order(store, seed=0, shuffle_window=2), 1)


def test_each_shard_is_read_once_per_epoch_with_a_window_cache(store, monkeypatch):
    reads = []
    original = ShardReader.read

    def counting_read(self, rows=slice(None)):
        reads.append((self.info.name, rows))
        return original(self, rows)

    monkeypatch.setattr(ShardReader, "read", counting_read)
    list(_loader(store, shuffle_window=3, batch_size=3))
    names = [name for name, _ in reads]
    assert all(rows == slice(None) for _, rows in reads)
    assert sorted(names) == sorted(s.name for s in open_store(store).manifest.shards)


# --- resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop_after", "workers_before", "workers_after", "seed_after"), [
    (2, 0, 2, 1),     # mid-epoch, more workers
    (6, 2, 0, 1),     # before the short last batch, fewer workers
    (7, 0, 0, 1),     # exactly at the end of the epoch: resume starts epoch 1
    (9, 2, 1, 99),    # in epoch 1; the state's seed wins over the new config's
])
def test_resume_continues_with_identical_batches(store, stop_after, workers_before, workers_after, seed_after):
    options = dict(rank=1, world_size=2, batch_size=3, drop_last=False, shuffle_window=2)
    reference = _loader(store, seed=1, **options)
    assert len(reference) == 7  # 41 samples, 2 ranks: six steps of 3 + a short batch of 2
    expected = [batch for _ in range(3) for batch in reference]

    interrupted = _loader(store, seed=1, num_workers=workers_before, **options)
    seen = []
    while len(seen) < stop_after:
        for batch in interrupted:
            seen.append(batch)
            if len(seen) == stop_after:
                break
    _assert_same_batches(seen, expected[:stop_after])
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert set(state) >= {"version", "epoch", "samples_consumed", "seed"} and len(json.dumps(state)) < 200

    resumed = _loader(store, seed=seed_after, num_workers=workers_after, **options)
    resumed.load_state_dict(state)
    rest = [batch for _ in range(3) for batch in resumed][:len(expected) - stop_after]
    _assert_same_batches(rest, expected[stop_after:])


def test_state_from_another_version_or_partition_is_refused(store):
    loader = _loader(store, world_size=2)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="version"):
        _loader(store).load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match="world_size 2"):
        _loader(store).load_state_dict(state)
    _loader(store).load_state_dict({**state, "samples_consumed": 0})  # at an epoch boundary anything goes


# --- collation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(batch_size=5, shuffle_window=4),
    dict(batch_size=7, shuffle=False, shuffle_window=1),  # batches span more shards than are cached
])
def test_batches_hold_the_stores_samples(store, options):
    reader = open_store(store)
    loader = _loader(store, drop_last=False, **options)
    batches = list(loader)
    assert sum(len(b["sample_ids"]) for b in batches) == NUM_SAMPLES
    for batch in batches:
        size = len(batch["sample_ids"])
        samples = [reader[i] for i in batch["sample_ids"].tolist()]
        shapes = {"input_ids": (size, SEQ_LEN + 1), "attention_mask": (size, SEQ_LEN + 1),
                  "loss_mask": (size, SEQ_LEN), "entropy": (size, SEQ_LEN), "true_logprob": (size, SEQ_LEN),
                  "topk_ids": (size, SEQ_LEN, TOP_K), "topk_logprobs": (size, SEQ_LEN, TOP_K),
                  "tail_logmass": (size, SEQ_LEN), "hidden_states_0": (size, SEQ_LEN, 64)}
        dtypes = {"input_ids": torch.int64, "attention_mask": torch.bool, "loss_mask": torch.bool,
                  "topk_ids": torch.int64}
        for name, shape in shapes.items():
            assert batch[name].shape == shape and batch[name].dtype == dtypes.get(name, torch.float32), name
            want = np.stack([s[name] for s in samples])
            assert np.array_equal(batch[name].numpy(), want.astype(batch[name].numpy().dtype)), name
        assert batch["sample_ids"].dtype == torch.int64

        nunique = np.stack([s["sampled_nunique"] for s in samples]).astype(np.int64)
        ids, counts = batch["sampled_ids"], batch["sampled_counts"]
        assert ids.shape == counts.shape == (size, SEQ_LEN, nunique.max())
        assert ids.dtype == torch.int64 and counts.dtype == torch.float32
        for b, sample in enumerate(samples):
            start = 0
            for t in range(SEQ_LEN):
                n = int(sample["sampled_nunique"][t])
                stored = slice(start, start + n)
                real = counts[b, t] != 0
                assert real.tolist() == [True] * n + [False] * (ids.shape[2] - n)
                assert ids[b, t, :n].tolist() == sample["sampled_ids"][stored].tolist()
                assert counts[b, t, :n].tolist() == sample["sampled_counts"][stored].tolist()
                assert not ids[b, t, n:].any()
                start += n
            assert start == len(sample["sampled_ids"])
        # Independent fact of the store: the draws of a trained position sum to num_draws.
        assert torch.equal(counts.sum(-1), batch["loss_mask"].float() * NUM_DRAWS)


# --- selection and held-out split ---------------------------------------------------------------------------------


SELECTION = [40, 3, 17, 0, 22, 9, 35, 11, 28, 5, 39, 1, 30]


def test_selection_file_gives_exactly_those_ids_in_order(store, tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"sample_ids": SELECTION}))
    loader = _loader(store, selection=str(path), batch_size=4, drop_last=False, seed=8)
    for _ in range(2):  # the same every epoch
        assert [i for b in _epoch_ids(loader) for i in b] == SELECTION
    path.write_text(json.dumps(SELECTION))
    per_rank = [_epoch_ids(_loader(store, rank, 2, selection=str(path), batch_size=2, num_workers=2))
                for rank in range(2)]
    interleaved = [i for step in zip(*per_rank, strict=True) for b in step for i in b]
    assert interleaved == SELECTION[:12]


def test_selection_with_unknown_ids_is_refused(store, tmp_path):
    path = tmp_path / "bad-selection.json"
    path.write_text(json.dumps({"sample_ids": [0, 41, 7, -2]}))
    with pytest.raises(ValueError, match=r"bad-selection\.json.*\[41, -2\].*41 samples"):
        _loader(store, selection=str(path))


def test_held_out_tail_and_training_split_are_complementary(store):
    train = _full_order(store, exclude_fraction_from_end=0.25, seed=2)
    held_out = _full_order(store, only_fraction_from_end=0.25, seed=2)
    assert sorted(train) == list(range(31)) and train != sorted(train)  # round(41 * 0.25) = 10 held out
    assert sorted(held_out) == list(range(31, NUM_SAMPLES))
    assert not set(train) & set(held_out)


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_store_and_oversized_batches_are_refused(store, tmp_path):
    with pytest.raises(RuntimeError, match="manifest.json"):
        _loader(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="batch_size: 42 .* 41 samples"):
        _loader(store, batch_size=42)
    with pytest.raises(ValueError, match="batch_size: 21 .* 20 samples"):
        _loader(store, world_size=2, batch_size=21)
    assert len(_loader(store, batch_size=42, drop_last=False)) == 1
    with pytest.raises(ValueError, match="batch_size: 5 .* 4 samples"):  # round(41 * 0.1) held out
        _loader(store, batch_size=5, only_fraction_from_end=0.1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_read_errors_reach_the_training_loop(store, tmp_path, num_workers):
    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    shutil.rmtree(broken / "shards" / "shard-000003" / "topk_ids")
    loader = _loader(str(broken), shuffle=False, batch_size=4, num_workers=num_workers)
    seen = []
    with pytest.raises((KeyError, RuntimeError), match="topk_ids"):  # the reader's error, raised in this process
        for batch in loader:
            seen.append(batch["sample_ids"].tolist())
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]][:len(seen)] and len(seen) <= 3


@pytest.mark.parametrize(("option", "value"), [
    ("batch_size", 0), ("shuffle_window", 0), ("num_workers", -1), ("seed", -1),
    ("exclude_fraction_from_end", 1.0), ("only_fraction_from_end", -0.1),
])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ValueError, match=option):
        LoaderConfig(store="unused", **{"batch_size": 1, option: value})


def test_split_options_do_not_combine(tmp_path):
    with pytest.raises(ValueError, match="exclude_fraction_from_end and only_fraction_from_end"):
        LoaderConfig(store="unused", batch_size=1, exclude_fraction_from_end=0.1, only_fraction_from_end=0.1)
    with pytest.raises(ValueError, match="selection"):
        LoaderConfig(store="unused", batch_size=1, selection=str(tmp_path / "s.json"), only_fraction_from_end=0.1)
