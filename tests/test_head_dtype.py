"""The output head runs in float32 whatever the body's dtype, and `--dtype auto` fits the device.

Tiny Llamas saved in bfloat16 (an untied and a tied head) are built with `--dtype bfloat16`. The build also stores
the final hidden states in float32, which holds the bfloat16 body's output exactly; the reference applies the
checkpoint's head to them in float64, here in plain torch, and the stored top-k log-probs, entropy and true-token
log-probs must match it. The same hidden states through a bfloat16 head (what the build computed before its head ran
in float32) give log-probs measurably further off than the tolerance, so the comparison tells the two apart.

`--dtype auto` on CPU is float32 without AMX bfloat16 units and bfloat16 with them (the detection is monkeypatched;
its reading of /proc/cpuinfo is checked on hand-made files). With the vllm backend (skipped without vLLM), the engine
is asked for a float32 head: its log-probs are then not those of bfloat16 logits, whose pairwise differences all
fall on bfloat16's grid.

Legend: P trained positions of a sample, V vocabulary, K top-k, H hidden size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_DIR, require_vllm, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from storage import causal_lm, open_store
from storage.causal_lm import CausalLM
from teacher_cache import BuildConfig, build_cache

L, K = 32, 8
STEP = 1 / 64  # stored top-k log-probs are the nearest multiple of STEP to the build's float32 value
# The build's float32 head against the float64 one here, on the same hidden states: float32 rounding of logits
# below 40, measured well under 1e-5 nat; NOISE covers it ten times over.
NOISE = 1e-4
WITHIN = STEP / 2 + NOISE


def tiny_llama(path: Path, *, tied: bool, dtype: torch.dtype = torch.bfloat16, heads: int = 4, seed: int = 0) -> Path:
    """A 2-layer Llama (width 64) with random weights and a sharpened head, saved in `dtype` with the Llama-2
    tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # peaked distributions, as a trained model's
    model.to(dtype).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["untied", "tied"])
def bf16_dir(request, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp(f"llama-bf16-{request.param}"), tied=request.param == "tied")


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("head-data") / "docs.jsonl", corpus_texts[:12])


def build(model_dir: Path, data: Path, output: Path, **options):
    config = dict(model=str(model_dir), dataset=str(data), output=str(output), seq_len=L, batch_size=4,
                  samples_per_shard=8, max_samples=8, top_k=K, targets=("topk",), device="cpu")
    build_cache(BuildConfig(**(config | options)))
    return open_store(output)


@pytest.fixture(scope="module")
def bf16_store(bf16_dir, data, tmp_path_factory):
    """A bfloat16 build with the final hidden states (layer 2 of 2) stored in float32."""
    return build(bf16_dir, data, tmp_path_factory.mktemp("bf16-build") / "store", dtype="bfloat16",
                 hidden_layers=(-1,), hidden_dtype="float32")


def head_weight(model_dir: Path) -> torch.Tensor:
    """[V, H] the checkpoint's output head, as stored (bfloat16)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    return model.get_output_embeddings().weight.detach()


def test_bfloat16_build_stores_the_float32_head_of_the_bfloat16_body(bf16_dir, bf16_store):
    weight_VH = head_weight(bf16_dir)
    manifest = bf16_store.manifest
    assert (manifest.teacher["dtype"], manifest.teacher["head_dtype"]) == ("bfloat16", "float32")
    worst_gap = 0.0  # largest distance between the float32-head and the bfloat16-head reference
    for i in range(len(bf16_store)):
        sample = bf16_store[i]
        pos = np.flatnonzero(sample["loss_mask"])
        hidden_PH = torch.from_numpy(sample["hidden_states_2"][pos])
        # The body's output is bfloat16: stored in float32, it holds bfloat16 values exactly.
        assert torch.equal(hidden_PH, hidden_PH.bfloat16().float())
        logp_PV = (hidden_PH.double() @ weight_VH.double().T).log_softmax(-1)
        bf16_logp_PV = F.linear(hidden_PH.bfloat16(), weight_VH).double().log_softmax(-1)
        true_ids = torch.from_numpy(sample["input_ids"][pos + 1].astype(np.int64))[:, None]

        true_ref = logp_PV.gather(1, true_ids)[:, 0].numpy()
        np.testing.assert_allclose(sample["true_logprob"][pos], true_ref, rtol=0, atol=NOISE)
        entropy_ref = -(logp_PV.exp() * logp_PV).sum(-1).numpy()
        np.testing.assert_allclose(sample["entropy"][pos], entropy_ref, rtol=0, atol=NOISE)

        ids = torch.from_numpy(sample["topk_ids"][pos].astype(np.int64))
        vals = sample["topk_logprobs"][pos].astype(np.float64)
        np.testing.assert_allclose(vals, logp_PV.gather(1, ids).numpy(), rtol=0, atol=WITHIN)
        top_vals, top_ids = logp_PV.topk(K + 1, dim=-1)
        separated = (top_vals[:, K - 1] - top_vals[:, K] > NOISE).numpy()
        assert separated.mean() > 0.5
        for row in np.flatnonzero(separated):
            assert set(ids[row].tolist()) == set(top_ids[row, :K].tolist()), (i, pos[row])

        worst_gap = max(worst_gap, float((bf16_logp_PV.gather(1, true_ids) - logp_PV.gather(1, true_ids)).abs().max()),
                        float((bf16_logp_PV.gather(1, ids) - logp_PV.gather(1, ids)).abs().max()))
    # bfloat16 logits (8 significant bits: steps of 1/8 at magnitude 16) are off by far more than the tolerances
    # above, so stores built with the head in bfloat16 fail them.
    assert worst_gap > 2 * WITHIN, worst_gap


def test_head_copy_is_float32_and_the_body_stays_bfloat16(bf16_dir):
    lm = CausalLM(str(bf16_dir), device="cpu", dtype="bfloat16")
    embedding_VH = lm.model.get_input_embeddings().weight
    assert lm.model.dtype == embedding_VH.dtype == torch.bfloat16
    assert lm.head_weight_VH.dtype == lm.head_dtype == torch.float32
    assert torch.equal(lm.head_weight_VH, lm.model.get_output_embeddings().weight.float())
    if lm.model.config.tie_word_embeddings:
        assert lm.model.get_output_embeddings().weight.data_ptr() == embedding_VH.data_ptr()


@pytest.mark.parametrize("amx, checkpoint, expected", [(False, "bfloat16", "float32"), (True, "float32", "bfloat16")])
def test_auto_dtype_on_cpu_follows_amx(monkeypatch, caplog, tmp_path, data, amx, checkpoint, expected):
    """The checkpoint's dtype is the other one, so the choice is the detection's, not the checkpoint's."""
    model_dir = tiny_llama(tmp_path / "model", tied=False, dtype=causal_lm.TORCH_DTYPES[checkpoint])
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == checkpoint
    monkeypatch.setattr(causal_lm, "cpu_has_amx_bf16", lambda: amx)
    with caplog.at_level(logging.INFO, logger="storage.causal_lm"):
        store = build(model_dir, data, tmp_path / "store", dtype="auto", max_samples=4)
    assert (store.manifest.teacher["dtype"], store.manifest.teacher["head_dtype"]) == (expected, "float32")
    assert f"dtype auto: {expected} on this CPU ({'AMX' if amx else 'no AMX'})" in caplog.text


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),
    ("fpu sse2 avx2 avx512f avx512_bf16", False),  # bfloat16 vector instructions, no matrix units
    ("fpu sse2 avx2 amx_tile amx_int8", False),
])
def test_amx_bfloat16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {flags}\n")
    monkeypatch.setattr(causal_lm, "CPUINFO", cpuinfo)
    assert causal_lm.cpu_has_amx_bf16() is expected
    monkeypatch.setattr(causal_lm, "CPUINFO", tmp_path / "absent")  # no /proc/cpuinfo: macOS, Windows
    assert causal_lm.cpu_has_amx_bf16() is False


def test_head_check_refuses_a_logit_scale_the_model_does_not_apply(tmp_path):
    """A `logit_scale` in a Llama's config is applied by `CausalLM.logits` but not by the model: logits 4% off.

    The model's own bfloat16 logits and the float32 head differ by bfloat16 rounding (2^-8 of the largest logit at
    most), so 4% is caught under the tolerance of 4 eps (3.1%), which was 5% when both ran in bfloat16.
    """
    model_dir = tiny_llama(tmp_path / "model", tied=False)
    CausalLM(str(model_dir), device="cpu", dtype="bfloat16")  # as saved: accepted
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"logit_scale": 0.96}))
    with pytest.raises(RuntimeError, match="post-processes its logits in a way this project does not reproduce"):
        CausalLM(str(model_dir), device="cpu", dtype="bfloat16")


def test_vllm_engine_runs_the_head_in_float32(tmp_path):
    """vLLM's prompt log-probs of a bfloat16 engine are not those of bfloat16 logits.

    Two logits of magnitude 1 or more in bfloat16 differ by a multiple of 2^-7, and so do their log-probs (the same
    log-sum-exp is subtracted from both, in float32). The top-k logits of this sharpened head are all above 1, so
    with a bfloat16 head every difference between a position's top-k log-probs is within float32 noise of that grid;
    with a float32 head about 2 * 1e-4 * 128, 3%, are, by chance.
    """
    require_vllm("the vllm backend's float32 head")
    from storage.samples import Rows
    from teacher_cache.vllm_backend import VLLMTeacher

    model_dir = tiny_llama(tmp_path / "model", tied=False, heads=2)  # head size 32: vLLM's CPU attention needs it
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = np.asarray(tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
                               "suffer the slings and arrows of outrageous fortune").input_ids[:L + 1], np.int64)
    rows = Rows(input_ids=ids[None], attention_mask=np.ones((1, len(ids)), bool),
                loss_mask=np.ones((1, len(ids) - 1), bool), segment_ids=np.zeros((1, len(ids)), np.uint16))
    teacher = VLLMTeacher(str(model_dir), top_k=K, seq_len=L, dtype="bfloat16", gpu_memory_utilization=0.3)
    try:
        identity = teacher.identity()
        _, logp_BLK1 = teacher.prompt_logprobs(rows)
    finally:
        teacher.close()
    assert (identity["dtype"], identity["head_dtype"]) == ("bfloat16", "float32")
    top_PK = logp_BLK1[0, : len(ids) - 1, 1:].astype(np.float64)
    differences = (top_PK[:, :1] - top_PK[:, 1:]) * 128
    on_grid = np.abs(differences - np.round(differences)) < 128 * NOISE
    assert on_grid.mean() < 0.2, on_grid.mean()
