"""Hybrid targets (`--targets hybrid`): the exact top-k record plus N draws from the teacher's distribution
conditioned on its tail, the ids outside the top-k.

The pure numerics (`extract_targets` with `draws_from_tail`, `encode_draws` with `drawn_P`) are checked on random
heads against a float64 softmax computed here: the head equals the plain top-k record, no drawn id is in the
position's top-k, counts sum to N, and over many draws the frequency of each tail id matches p(v) / tail mass
within five standard errors (a Pearson chi-square on top). A real `teacher-cache build --targets hybrid` of a tiny
Llama is read back with json + zarr + numpy alone and checked the same way against the model's own forward pass.

Legend: P positions, V vocabulary, H hidden size, K top-k, N draws, E entries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import AutoModelForCausalLM

from storage.concat import concat_stores
from teacher_cache import BuildConfig
from teacher_cache.cli import main
from teacher_cache.targets import TargetSpec, extract_targets
from teacher_cache.targets.sampled import encode_draws

K, N, SEQ_LEN = 8, 64, 32
FLAT = ("sampled_ids", "sampled_counts")


def random_head(V: int, P: int, *, H: int = 16, scale: float = 3.0, seed: int = 0):
    """(hidden [P, H], true ids [P], logits_fn, head [V, H]) of a random linear output head."""
    g = torch.Generator().manual_seed(seed)
    head_VH = torch.randn(V, H, generator=g) * scale
    hidden_PH = torch.randn(P, H, generator=g)
    return hidden_PH, torch.randint(0, V, (P,), generator=g), lambda h_pH: h_pH @ head_VH.T, head_VH


def extract_from_logits(logits_PV: torch.Tensor, spec: TargetSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """`extract_targets` of positions whose logits are exactly `logits_PV`, -inf included (a matmul would turn
    0 * -inf into NaN): each position's hidden state is its row index."""
    P = len(logits_PV)
    return extract_targets(torch.arange(P, dtype=torch.float32)[:, None], torch.zeros(P, dtype=torch.long),
                           lambda h_p1: logits_PV[h_p1[:, 0].long()], spec, torch.Generator().manual_seed(seed))


def per_position(out: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(ids, counts) of every position of an `extract_targets` result."""
    sizes = out["sampled_nunique"].tolist()
    return [(ids.tolist(), counts.tolist()) for ids, counts in zip(
        torch.split(out["sampled_ids"], sizes), torch.split(out["sampled_counts"], sizes), strict=True)]


def dense_counts(out: dict[str, torch.Tensor], V: int) -> torch.Tensor:
    """[P, V] float64 counts of each id's draws."""
    P = out["sampled_nunique"].shape[0]
    row_E = torch.repeat_interleave(torch.arange(P), out["sampled_nunique"])
    return torch.zeros(P, V, dtype=torch.float64).index_put_(
        (row_E, out["sampled_ids"]), out["sampled_counts"].double(), accumulate=True)


def assert_frequencies_match(counts_PV: torch.Tensor, t_PV: torch.Tensor, n: int) -> None:
    """Every count within 5 binomial standard errors (+1 for discreteness) of n * t, and a Pearson chi-square over
    the cells expecting at least 5 draws (the rest of each position pooled into one cell) with p-value > 1e-6."""
    expected_PV = n * t_PV
    sd_PV = (n * t_PV * (1 - t_PV)).sqrt()
    worst = ((counts_PV - expected_PV).abs() - 5 * sd_PV - 1).max()
    assert worst <= 0, float(worst)
    keep_PV = expected_PV >= 5
    o = torch.cat([counts_PV[keep_PV], torch.where(keep_PV, 0.0, counts_PV).sum(1)])
    e = torch.cat([expected_PV[keep_PV], torch.where(keep_PV, 0.0, expected_PV).sum(1)])
    o, e = o[e > 0], e[e > 0]
    df = len(o) - counts_PV.shape[0]  # each position's counts sum to n
    chi2 = float(((o - e) ** 2 / e).sum())
    assert df > 0 and float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2))) > 1e-6, (chi2, df)


# ----------------------------------------------------------------------------------------- pure numerics


def test_head_is_the_topk_record_and_draws_stay_in_the_tail():
    hidden_PH, true_P, logits_fn, _ = random_head(V=40, P=23)
    hybrid = extract_targets(hidden_PH, true_P, logits_fn,
                             TargetSpec(top_k=5, num_draws=50, chunk_positions=7, draws_from_tail=True),
                             torch.Generator().manual_seed(0))
    plain = extract_targets(hidden_PH, true_P, logits_fn, TargetSpec(top_k=5, num_draws=None, chunk_positions=7))
    assert set(hybrid) == set(plain) | {"sampled_nunique", *FLAT}
    for name in plain:  # the top-k path is the plain one, bit for bit
        assert torch.equal(hybrid[name], plain[name]), name
    for top, (ids, counts) in zip(hybrid["topk_ids"].tolist(), per_position(hybrid), strict=True):
        assert sum(counts) == 50 and min(counts) >= 1
        assert ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < 40
        assert not set(ids) & set(top)


def test_tail_draw_frequencies_match_the_tail_conditional_distribution():
    """40 positions x 4000 draws against p(v) / sum of p outside the top-4, computed in float64 from the head."""
    V, K_, P, N_ = 30, 4, 40, 4000
    hidden_PH, true_P, logits_fn, head_VH = random_head(V=V, P=P, scale=1.0)
    out = extract_targets(hidden_PH, true_P, logits_fn,
                          TargetSpec(top_k=K_, num_draws=N_, chunk_positions=16, draws_from_tail=True),
                          torch.Generator().manual_seed(0))
    logp_PV = (hidden_PH.double() @ head_VH.double().T).log_softmax(-1)
    assert torch.equal(out["topk_ids"], logp_PV.topk(K_, -1).indices.sort(-1).values)
    tail_PV = logp_PV.scatter(1, out["topk_ids"], float("-inf")).exp()
    t_PV = tail_PV / tail_PV.sum(-1, keepdim=True)
    assert (t_PV > 0.01).sum(-1).double().mean() > 5  # tails spread over several ids: the check has teeth
    counts_PV = dense_counts(out, V)
    assert (counts_PV.gather(1, out["topk_ids"]) == 0).all() and (counts_PV.sum(1) == N_).all()
    assert_frequencies_match(counts_PV, t_PV, N_)
    # The estimator exp(tail_logmass) * count / N of each tail id is unbiased: summed, the draws give the tail mass.
    torch.testing.assert_close(out["tail_logmass"].double().exp(), tail_PV.sum(-1), rtol=1e-5, atol=0)


def test_a_tail_below_fp32_is_drawn_from_exactly():
    """Top-1 at logit 200: the tail (about e^-200) underflows fp32 probabilities, but its conditional distribution,
    the softmax of the other logits, is drawn from as exactly as any other."""
    P, V, N_ = 4, 12, 4000
    logits_PV = torch.linspace(0.0, 3.0, V).repeat(P, 1)
    logits_PV[:, 0] = 200.0
    out = extract_from_logits(logits_PV, TargetSpec(top_k=1, num_draws=N_, draws_from_tail=True), seed=1)
    assert torch.exp(out["tail_logmass"]).eq(0).all() and torch.isfinite(out["tail_logmass"]).all()
    t_PV = torch.cat([torch.zeros(P, 1), logits_PV[:, 1:]], 1).double()
    t_PV[:, 1:] = t_PV[:, 1:].softmax(-1)
    assert_frequencies_match(dense_counts(out, V), t_PV, N_)


def test_positions_without_a_tail_get_no_entries():
    # k = V: no position has a tail
    hidden_PH, true_P, logits_fn, _ = random_head(V=20, P=9)
    out = extract_targets(hidden_PH, true_P, logits_fn, TargetSpec(top_k=20, num_draws=7, draws_from_tail=True,
                                                                   chunk_positions=4))
    assert out["sampled_nunique"].tolist() == [0] * 9
    assert out["sampled_ids"].numel() == out["sampled_counts"].numel() == 0
    # every id outside the top-3 at probability 0 (logit -inf) at positions 1 and 4 only
    P, V = 6, 12
    logits_PV = torch.randn(P, V, generator=torch.Generator().manual_seed(0))
    logits_PV[[1, 4], 3:] = float("-inf")
    out = extract_from_logits(logits_PV, TargetSpec(top_k=3, num_draws=9, draws_from_tail=True))
    assert torch.isneginf(out["tail_logmass"]).tolist() == [p in (1, 4) for p in range(P)]
    top = out["topk_ids"].tolist()
    for p, (ids, counts) in enumerate(per_position(out)):
        if p in (1, 4):
            assert (ids, counts) == ([], []), p
        else:
            assert sum(counts) == 9 and not set(ids) & set(top[p]), p


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 12)),
       st.data())
def test_encode_draws_keeps_only_the_drawn_positions(draws, data):
    drawn = np.array(data.draw(st.lists(st.booleans(), min_size=len(draws), max_size=len(draws))), dtype=bool)
    out = encode_draws(torch.from_numpy(draws), drawn_P=torch.from_numpy(drawn))
    kept = encode_draws(torch.from_numpy(draws[drawn]))
    assert out["sampled_nunique"].tolist() == [len(np.unique(row)) if d else 0 for row, d in zip(draws, drawn,
                                                                                                 strict=True)]
    assert torch.equal(out["sampled_ids"], kept["sampled_ids"]) and torch.equal(out["sampled_counts"],
                                                                                kept["sampled_counts"])
    np.testing.assert_array_equal(torch.repeat_interleave(out["sampled_ids"], out["sampled_counts"]).numpy(),
                                  np.sort(draws[drawn], axis=1).ravel())


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_tail_draws_property(data):
    """Any logits (-inf allowed outside column 0), any k <= V: draws avoid the top-k, sum to N where the tail has
    mass and are absent where it has none."""
    P, V = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 12))
    k, n = data.draw(st.integers(1, V)), data.draw(st.integers(1, 20))
    finite = st.floats(-30, 30, allow_nan=False, width=32)
    logits = data.draw(arrays(np.float32, (P, V), elements=st.one_of(finite, st.just(-np.inf))))
    logits[:, 0] = data.draw(arrays(np.float32, P, elements=finite))
    logits_PV = torch.from_numpy(logits)
    out = extract_from_logits(logits_PV, TargetSpec(top_k=k, num_draws=n, draws_from_tail=True, chunk_positions=4))
    for top, tail, (ids, counts) in zip(out["topk_ids"].tolist(), out["tail_logmass"].tolist(), per_position(out),
                                        strict=True):
        if tail == -math.inf:
            assert (ids, counts) == ([], [])
        else:
            assert sum(counts) == n and ids == sorted(set(ids)) and not set(ids) & set(top)


# ------------------------------------------------------------------------------------------ a real build


def read_with_zarr(root: Path) -> tuple[dict, list[dict]]:
    """The manifest and every sample, as FORMAT.md describes: json + zarr + numpy, nothing from this project.
    Each sample holds its dense arrays without the sample axis, and `draws` = [(ids, counts)] per position when
    the store has draws."""
    manifest = json.loads((root / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        group = zarr.open_group(str(root / shard["name"]), mode="r")
        arrays_ = {name: array[...] for name, array in group.arrays()}
        for row in range(shard["num_samples"]):
            sample = {name: value[row] for name, value in arrays_.items() if name not in FLAT}
            samples.append(sample)
            if "sampled_offsets" not in arrays_:
                continue
            ends = int(arrays_["sampled_offsets"][row]) + np.cumsum(sample["sampled_nunique"].astype(np.int64))
            sample["draws"] = [(arrays_["sampled_ids"][e - u:e].astype(np.int64),
                                arrays_["sampled_counts"][e - u:e].astype(np.int64))
                               for u, e in zip(sample["sampled_nunique"].astype(np.int64), ends, strict=True)]
    return manifest, samples


def _build(llama_dir, data, output, *options):
    result = CliRunner().invoke(main, [
        "build", "--model", str(llama_dir), "--dataset", str(data), "--output", str(output), "--seq-len",
        str(SEQ_LEN), "--batch-size", "4", "--samples-per-shard", "4", "--max-samples", "6", "--top-k", str(K),
        "--samples", str(N), "--device", "cpu", "--dtype", "float32", *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return output, result


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hybrid-data") / "docs.jsonl", corpus_texts[:30])


@pytest.fixture(scope="module")
def hybrid_store(tmp_path_factory, llama_dir, data):
    """(store, CLI result) of `teacher-cache build --targets hybrid`: 6 samples in shards of 4 (entries split)."""
    return _build(llama_dir, data, tmp_path_factory.mktemp("hybrid") / "store", "--targets", "hybrid")


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, llama_dir, data) -> Path:
    return _build(llama_dir, data, tmp_path_factory.mktemp("topk") / "store", "--targets", "topk")[0]


def test_cli_build_writes_a_version_4_store_of_tail_draws(hybrid_store):
    store, result = hybrid_store
    assert "Wrote 6 samples" in result.output
    manifest, samples = read_with_zarr(store)
    assert manifest["format"] == "teacher-cache" and manifest["format_version"] == 4
    targets = manifest["targets"]
    assert targets["sampled"]["draws_from"] == "tail" and targets["sampled"]["num_draws"] == N
    assert targets["topk"]["k"] == K and "tail_bucket_id" not in targets["sampled"]
    assert len(samples) == 6 and sum(int(s["loss_mask"].sum()) for s in samples) == 6 * SEQ_LEN
    for sample in samples:
        for t, (ids, counts) in enumerate(sample["draws"]):
            if sample["loss_mask"][t]:
                assert counts.sum() == N and (counts >= 1).all() and (np.diff(ids) > 0).all()
                assert not set(ids.tolist()) & set(sample["topk_ids"][t].tolist()), t
            else:
                assert len(ids) == 0


def test_the_head_equals_a_topk_store(hybrid_store, topk_store):
    """Top-k, tail, entropy and true-token log-prob are those of `--targets topk` with the same options."""
    (_, hybrid), (_, topk) = read_with_zarr(hybrid_store[0]), read_with_zarr(topk_store)
    for a, b in zip(hybrid, topk, strict=True):
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_draws_follow_the_teachers_tail(hybrid_store, llama_dir):
    """Over every trained position: the draws' mass on each bin of tail-conditional probability p(v) / m (m the
    mass outside the stored top-k, from the model's own forward in float64) matches its expectation."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    _, samples = read_with_zarr(hybrid_store[0])
    edges = torch.tensor((0.5, 0.1, 0.01, 1e-3), dtype=torch.float64)
    stats = torch.zeros(3, len(edges) + 1, dtype=torch.float64)  # observed, expected, variance per bin
    for sample in samples:
        n = int(sample["attention_mask"][:-1].sum())
        with torch.no_grad():
            logits = model(torch.from_numpy(sample["input_ids"][:n].astype(np.int64))[None]).logits[0]
        positions = np.flatnonzero(sample["loss_mask"])
        logp_PV = logits.double().log_softmax(-1)[positions]
        tail_PV = logp_PV.scatter(1, torch.from_numpy(sample["topk_ids"][positions].astype(np.int64)),
                                  float("-inf")).exp()
        t_PV = tail_PV / tail_PV.sum(-1, keepdim=True)
        bin_PV = torch.bucketize(-t_PV, -edges)
        mass_PB = torch.zeros(len(positions), len(edges) + 1, dtype=torch.float64).scatter_add_(1, bin_PV, t_PV)
        observed_B = torch.zeros(len(edges) + 1, dtype=torch.float64)
        for row, t in enumerate(positions):
            ids, counts = sample["draws"][t]
            observed_B.index_add_(0, bin_PV[row, torch.from_numpy(ids)], torch.from_numpy(counts).double())
        stats += torch.stack([observed_B, N * mass_PB.sum(0), N * (mass_PB * (1 - mass_PB)).sum(0)])
    observed_B, expected_B, variance_B = stats
    assert observed_B.sum() == N * 6 * SEQ_LEN
    for b in range(len(edges) + 1):
        assert abs(observed_B[b] - expected_B[b]) <= 5 * math.sqrt(variance_B[b]) + 1, (b, stats[:, b])
    assert (expected_B > N).sum() >= 2  # the draws spread over several bins: the check has teeth


def test_info_and_inspect_show_a_hybrid_store(hybrid_store):
    store, _ = hybrid_store
    described = f"hybrid: top-{K} + tail mass, {N} draws from the tail outside the top-{K} (systematic)"
    info = CliRunner().invoke(main, ["info", str(store)])
    assert info.exit_code == 0 and described in info.output, info.output
    report = json.loads(CliRunner().invoke(main, ["info", str(store), "--json"]).output)
    assert report["targets_summary"] == described and report["format_version"] == 4
    inspect = CliRunner().invoke(main, ["inspect", str(store)])
    assert inspect.exit_code == 0 and f"targets    {described}" in inspect.output, inspect.output


def test_hybrid_stores_concatenate_only_with_hybrid_stores(tmp_path, hybrid_store, topk_store):
    store, _ = hybrid_store
    manifest = concat_stores([store, store], tmp_path / "twice")
    assert manifest.format_version == 4 and manifest.targets["sampled"]["draws_from"] == "tail"
    _, samples = read_with_zarr(tmp_path / "twice")
    _, once = read_with_zarr(store)
    for a, b in zip(samples, once + once, strict=True):
        assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
                   for x, y in zip(a["draws"], b["draws"], strict=True))
    with pytest.raises(ValueError, match=r"(?s)targets\.sampled: .*hybrid targets .*--targets"):
        concat_stores([store, topk_store], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# ------------------------------------------------------------------------------------------------ options


def _config(**options) -> BuildConfig:
    return BuildConfig(model="teacher", dataset="data.jsonl", output="out", **options)


def test_target_kinds_and_their_combinations():
    assert _config().targets == ("topk", "sampled")  # the default is unchanged
    hybrid = _config(targets=("topk", "hybrid"))
    assert hybrid.targets == ("hybrid",) and hybrid.stores_topk and hybrid.stores_draws and hybrid.draws_from_tail
    plain = _config(targets=("topk", "sampled"))
    assert plain.stores_topk and plain.stores_draws and not plain.draws_from_tail
    with pytest.raises(ValueError, match=r"(?s)--targets hybrid,sampled: a store holds one sampled record.*"
                                         r"--targets hybrid .*--targets topk,sampled"):
        _config(targets=("hybrid", "sampled"))
    with pytest.raises(ValueError, match="choose from topk, sampled, hybrid"):
        _config(targets=("tail",))


def test_vllm_hybrid_is_refused_at_config_time(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)--targets hybrid: the vllm backend.*max_logprobs.*logprobs=-1.*"
                                         r"--backend transformers.*--targets topk,sampled"):
        _config(targets=("hybrid",), backend="vllm")
    result = CliRunner().invoke(main, ["build", "--model", str(tmp_path / "no-model"), "--dataset", "d.jsonl",
                                       "--output", str(tmp_path / "out"), "--backend", "vllm", "--targets", "hybrid"])
    assert result.exit_code == 2 and "--backend transformers" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_student_train_cli_learns_the_hybrid_target_of_a_cli_built_store(tmp_path, hybrid_store, llama_dir):
    """End to end: `teacher-cache build --targets hybrid`, then `student-train` on it with its default targets. The
    first step's forward KL is KL(p^ || q) over the whole vocabulary, p^ built here from the stored records (head
    renormalised with the tail, each drawn tail id at tail x count / N), q the student at its seeded init."""
    from conftest import make_student_config
    from transformers import AutoConfig

    from student_train.cli import main as train_main
    from student_train.loader import LoaderConfig, StoreLoader

    store, _ = hybrid_store
    student = make_student_config(tmp_path / "student", llama_dir)
    seed, batch_size = 3, 2
    result = CliRunner().invoke(train_main, [
        "--store", str(store), "--student", str(student), "--output", str(tmp_path / "run"), "--batch-size",
        str(batch_size), "--max-steps", "2", "--seed", str(seed), "--eval-store", str(store), "--loss", "forward_kl=1",
        "--device", "cpu", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    batch = next(iter(StoreLoader(LoaderConfig(store=str(store), batch_size=batch_size, seed=seed))))
    torch.manual_seed(seed)  # the student's random init, as training makes it
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student), dtype=torch.float32)
    with torch.no_grad():
        logq = model(batch["input_ids"][:, :-1]).logits.double().log_softmax(-1)
    kls = []
    for b, t in zip(*torch.nonzero(batch["loss_mask"], as_tuple=True), strict=True):
        head = torch.cat([batch["topk_logprobs"][b, t].double(), batch["tail_logmass"][b, t, None].double()])
        head = head.softmax(-1)  # the stored log-probs are rounded to 1/64 nat: renormalised with the tail
        p = torch.zeros(logq.shape[-1], dtype=torch.float64)
        p[batch["topk_ids"][b, t]] = head[:-1]
        counts, ids = batch["sampled_counts"][b, t].double(), batch["sampled_ids"][b, t]
        drawn = counts > 0
        assert drawn.any() and not torch.isin(ids[drawn], batch["topk_ids"][b, t]).any()
        p[ids[drawn]] += head[-1] * counts[drawn] / counts.sum()
        held = p > 0
        kls.append(float((p[held] * (p[held].log() - logq[b, t][held])).sum()))
    assert first["forward_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
