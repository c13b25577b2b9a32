"""The vllm backend against the transformers backend and brute force, on one shared engine.

One tiny Llama (head size 32, the smallest vLLM's CPU attention takes) is served by one vLLM engine for the whole
module (starting one costs ~20 s). Stores built by both backends from the same text must agree: the same top-k ids
(up to ties), log-probs within one storage step (1/64 nat), the tail mass, the true-token log-prob. The entropy bound
and the tail-bucket draws are checked against the model's full distribution computed here in float64.

vLLM is optional: without it these tests skip, naming the reason, except where TEACHER_CACHE_REQUIRE_VLLM=1 (CI
sets it), where its absence is a failure.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
from conftest import make_llama, make_student_config, require_vllm
from transformers import AutoModelForCausalLM

from storage import open_store
from teacher_cache import BuildConfig, build_cache
from teacher_cache.vllm_backend import TAIL_FLOOR, _flat, local_gpus

require_vllm("the vllm backend")

L, K, N = 48, 8, 64


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama-h32"), heads=2, kv_heads=1, seed=1)


@pytest.fixture(scope="module")
def engine(teacher_dir):
    from teacher_cache.vllm_backend import VLLMTeacher

    teacher = VLLMTeacher(str(teacher_dir), top_k=K, seq_len=L, dtype="float32", gpu_memory_utilization=0.3)
    yield teacher
    teacher.close()


def _config(teacher_dir, data, output, backend, **options) -> BuildConfig:
    base = dict(model=str(teacher_dir), dataset=str(data), output=str(output), seq_len=L, batch_size=4,
                samples_per_shard=6, top_k=K, num_draws=N, seed=0, max_samples=12, dtype="float32", device="cpu",
                backend=backend, gpu_memory_utilization=0.3)
    return BuildConfig(**(base | options))


@pytest.fixture(scope="module")
def built(teacher_dir, engine, corpus_jsonl, tmp_path_factory):
    """(vllm store, transformers store) of the same samples, packed or not, each built once."""
    cache = {}

    def get(pack: bool):
        if pack not in cache:
            root = tmp_path_factory.mktemp("parity")
            build_cache(_config(teacher_dir, corpus_jsonl, root / "vllm", "vllm", pack=pack), teacher=engine)
            build_cache(_config(teacher_dir, corpus_jsonl, root / "hf", "transformers", pack=pack))
            cache[pack] = open_store(root / "vllm"), open_store(root / "hf")
        return cache[pack]

    return get


@pytest.fixture(params=[True, False], ids=["packed", "unpacked"])
def stores(request, built):
    return built(request.param)


def _all(store) -> dict[str, np.ndarray]:
    shards = [shard.read() for shard in store.iter_shards()]
    return {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}


@pytest.fixture
def reference(teacher_dir, stores):
    """float64 log-softmax of the model's own logits at every trained position of the stores' samples."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    data = _all(stores[1])
    logp = np.zeros((*data["loss_mask"].shape, model.config.vocab_size))
    with torch.no_grad():
        for b, (ids, attention) in enumerate(zip(data["input_ids"], data["attention_mask"], strict=True)):
            n = int(attention.sum())
            logits = model(torch.from_numpy(ids[: n - 1].astype(np.int64))[None]).logits[0]
            logp[b, : n - 1] = torch.log_softmax(logits.double(), -1).numpy()
    return logp


def test_manifest_flags_every_approximation(stores):
    targets = stores[0].manifest.targets
    assert stores[0].manifest.teacher["backend"] == "vllm"
    assert targets["entropy"]["exact"] is False and targets["entropy"]["bound"] == "lower"
    assert targets["sampled"]["source"] == "top-k + tail bucket"
    assert targets["sampled"]["tail_bucket_id"] == 32000
    assert stores[1].manifest.targets["entropy"] == {"exact": True}


def test_same_samples_and_topk_as_transformers(stores):
    v, h = _all(stores[0]), _all(stores[1])
    for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids"):
        np.testing.assert_array_equal(v[name], h[name])
    mask = h["loss_mask"]
    assert mask.sum() > 200
    same = (v["topk_ids"] == h["topk_ids"]).all(-1)
    # Both stores round log-probs to 1/64 nat: values a hair apart in fp32 may land one step apart.
    step = 1 / 64 + 1e-6
    # Up to ties: where the sets differ, the k-th and (k+1)-th log-probs of the transformers store are within one
    # step of each other.
    for b, t in zip(*np.nonzero(mask & ~same), strict=True):
        assert np.abs(np.sort(v["topk_logprobs"][b, t]) - np.sort(h["topk_logprobs"][b, t])).max() <= step
    assert same[mask].mean() > 0.99
    close = mask & same
    np.testing.assert_allclose(v["topk_logprobs"][close].astype(np.float64), h["topk_logprobs"][close], atol=step)
    assert (v["topk_logprobs"][close] == h["topk_logprobs"][close]).mean() > 0.95
    np.testing.assert_allclose(v["true_logprob"][mask], h["true_logprob"][mask], atol=1e-4)
    np.testing.assert_allclose(np.exp(v["tail_logmass"][mask]), np.exp(h["tail_logmass"][mask]),
                               rtol=math.expm1(step), atol=1e-4)
    for name in ("entropy", "true_logprob", "tail_logmass", "topk_ids"):
        assert not v[name][~mask].any(), f"{name} is not zero at untrained positions"


def test_entropy_is_the_documented_lower_bound(stores, reference):
    v = _all(stores[0])
    mask = v["loss_mask"]
    logp = reference[mask]
    p = np.exp(logp)
    exact = -(p * logp).sum(-1)
    top = np.sort(logp, -1)[:, -K:]
    head = -(np.exp(top) * top).sum(-1)
    tail = np.maximum(1 - np.exp(top).sum(-1), TAIL_FLOOR)
    bound = head - tail * top[:, 0]
    np.testing.assert_allclose(v["entropy"][mask], bound, rtol=1e-4, atol=1e-4)
    assert (v["entropy"][mask] <= exact + 1e-4).all()
    assert (v["entropy"][mask] < exact - 1e-3).mean() > 0.5  # a bound, not the entropy: the tail is not uniform


def test_draws_come_from_topk_plus_tail_bucket(stores, reference):
    v = _all(stores[0])
    mask = v["loss_mask"]
    offsets = np.concatenate([[0], np.cumsum(v["sampled_nunique"].reshape(-1).astype(np.int64))])
    ids, counts = v["sampled_ids"].astype(np.int64), v["sampled_counts"].astype(np.int64)
    bucket_share, tail_mass = [], []
    for flat in np.flatnonzero(mask.reshape(-1)):
        b, t = divmod(flat, L)
        entries = slice(offsets[flat], offsets[flat + 1])
        assert counts[entries].sum() == N
        drawn = ids[entries]
        assert set(drawn[drawn != 32000]) <= set(v["topk_ids"][b, t]), "a draw outside the top-k that is not the bucket"
        bucket_share.append(counts[entries][drawn == 32000].sum() / N)
        tail_mass.append(np.exp(v["tail_logmass"][b, t]))
    # The share of draws in the bucket has the tail mass as its mean: a z-score over all positions.
    share, mass = np.array(bucket_share), np.array(tail_mass)
    z = (share.mean() - mass.mean()) / np.sqrt((mass * (1 - mass)).sum() / N) * len(mass)
    assert abs(z) < 4.5, z
    assert mass.mean() > 0.05  # the test teacher leaves real mass outside its top-8


def test_student_trains_on_either_store(built, tmp_path, teacher_dir):

    from student_train.config import TrainConfig
    from student_train.train import train

    student = tmp_path / "student"
    make_student_config(student, teacher_dir)
    finals = {}
    stores = built(True)
    for name, store in zip(("vllm", "hf"), stores, strict=True):
        for loss in ("sampled", "topk_tail"):
            out = tmp_path / f"{name}-{loss}"
            train(TrainConfig(store=str(store.location), student=str(student), output=str(out), batch_size=4,
                              max_steps=6, lr=1e-2, eval_fraction=0.25, eval_every=6, save_every=6, log_every=1,
                              device="cpu", seed=0, loss=loss, alpha=1.0))
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            finals[name, loss] = [r for r in records if "eval" in r][-1]["eval"]
    for evaluation in finals.values():
        assert np.isfinite(evaluation["lm_loss"]) and np.isfinite(evaluation["kl"])
    # The stores hold the same samples, the held-out KL uses the same top-k + tail estimator: the same student
    # trained on either reaches nearly the same place.
    for loss in ("sampled", "topk_tail"):
        assert abs(finals["vllm", loss]["lm_loss"] - finals["hf", loss]["lm_loss"]) < 0.05


def test_hidden_states_are_refused_with_the_fix(teacher_dir, corpus_jsonl, tmp_path):
    with pytest.raises(ValueError, match="--backend transformers"):
        _config(teacher_dir, corpus_jsonl, tmp_path / "s", "vllm", hidden_layers=(-1,))


def test_each_torchrun_worker_takes_its_own_gpus():
    assert local_gpus(1, {}) is None
    assert local_gpus(1, {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == "3"
    assert local_gpus(2, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "6,7"
    with pytest.raises(ValueError, match="nproc-per-node"):
        local_gpus(4, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_list_container_of_older_releases_gives_the_flat_layout():
    """Releases without flat log-probs return {id: Logprob} per position, the true token only once."""

    def lp(value, rank):
        return types.SimpleNamespace(logprob=value, rank=rank)

    positions = [
        None,
        {7: lp(-0.5, 1), 3: lp(-1.5, 2)},  # true token 3 inside the top-2
        {9: lp(-4.0, 5), 2: lp(-0.1, 1), 7: lp(-2.6, 2)},  # true token 9 outside, rank 5
    ]
    ids, values = _flat(positions, np.array([3, 9]), k=2)
    np.testing.assert_array_equal(ids, [3, 7, 3, 9, 2, 7])
    np.testing.assert_allclose(values, [-1.5, -0.5, -1.5, -4.0, -0.1, -2.6])
