"""What `storage/FORMAT.md` says a reader gets, checked on real builds read with json, zarr, numpy and pyarrow alone.

Each test takes one statement of the spec and checks it against facts computed here, independently of the build:
the tokenizer's own token ids (documents, EOS, padding, truncation, dropped one-token documents), hashes
recomputed by the spec's recipes (`config_sha256`, `weights_sha256`, `tokenizer_sha256`, `dataset.fingerprint`),
a plain forward pass of a bfloat16 teacher (the distribution the targets describe), and the `manifest.json` of a
store against the schema metadata of its Parquet export.

Legend: L seq_len.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from storage.identity import weights_fingerprint
from teacher_cache import BuildConfig, build_cache
from teacher_cache.cli import main

L = 16
MIB = 1 << 20
# Per FORMAT.md, "Fingerprints": keys of the model config that the config hash leaves out.
VOLATILE = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def read_with_zarr(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and the store's dense per-sample arrays, every shard's rows concatenated."""
    manifest = json.loads((root / "manifest.json").read_text())
    parts: dict[str, list[np.ndarray]] = {}
    for shard in manifest["shards"]:
        group = zarr.open_group(str(root / shard["name"]), mode="r")
        for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "true_logprob", "entropy"):
            parts.setdefault(name, []).append(group[name][:])
    return manifest, {name: np.concatenate(values) for name, values in parts.items()}


def build(model: Path, texts: list[str], root: Path, **options) -> tuple[dict, dict[str, np.ndarray], Path]:
    """`build_cache` of `texts` (a jsonl under `root`) into `root`/store; returns (manifest, arrays, dataset)."""
    data = write_jsonl(root / "docs.jsonl", texts)
    config = dict(model=str(model), dataset=str(data), output=str(root / "store"), seq_len=L, batch_size=4,
                  samples_per_shard=4, targets=("topk",), top_k=4, device="cpu", dtype="float32")
    build_cache(BuildConfig(**(config | options)))
    return *read_with_zarr(root / "store"), data


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def retokenized(llama_dir: Path, path: Path, **tokenizer_options) -> Path:
    """A copy of the tiny Llama at `path` whose tokenizer is loaded with `tokenizer_options` and saved."""
    path.mkdir()
    for file in llama_dir.iterdir():
        shutil.copy(file, path / file.name)
    AutoTokenizer.from_pretrained(llama_dir, **tokenizer_options).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eos_teacher(tmp_path_factory, llama_dir) -> Path:
    """The tiny Llama with a tokenizer that adds no BOS and appends EOS itself."""
    return retokenized(llama_dir, tmp_path_factory.mktemp("eos") / "teacher", add_bos_token=False, add_eos_token=True)


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory, llama_dir) -> Path:
    """The tiny Llama with a tokenizer that adds neither BOS nor EOS."""
    return retokenized(llama_dir, tmp_path_factory.mktemp("bare") / "teacher", add_bos_token=False)


def stream_of(documents: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document number of each token) of the documents concatenated."""
    tokens = np.concatenate([np.asarray(d, np.int64) for d in documents])
    docs = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    return tokens, docs


# --- documents, packing, padding ---------------------------------------------------------------------------------


def check_packed(arrays: dict, manifest: dict, stream: np.ndarray, docs: np.ndarray, eos: int) -> None:
    """FORMAT.md, "Samples and positions": sample i is stream[i*L : i*L + L + 1], padding holds the pad id (EOS
    without one) and the segment id of the sample's last real token."""
    assert manifest["teacher"]["pad_token_id"] is None
    num = -(-(len(stream) - 1) // L)
    assert arrays["input_ids"].shape == (num, L + 1)
    for i in range(num):
        window, window_docs = stream[i * L: i * L + L + 1], docs[i * L: i * L + L + 1]
        real = len(window)
        np.testing.assert_array_equal(arrays["input_ids"][i, :real], window)
        np.testing.assert_array_equal(arrays["attention_mask"][i], np.arange(L + 1) < real)
        np.testing.assert_array_equal(arrays["loss_mask"][i], arrays["attention_mask"][i, 1:])
        np.testing.assert_array_equal(arrays["segment_ids"][i, :real], window_docs - window_docs[0])
        assert (arrays["input_ids"][i, real:] == eos).all()
        assert (arrays["segment_ids"][i, real:] == window_docs[-1] - window_docs[0]).all()
    assert real < L + 1 and arrays["segment_ids"][-1, -1] > 0  # the last sample is padded, after several documents


def padded_across_documents(texts: list[str], documents) -> list[str]:
    """`texts` and as many short ones after them as make the last packed sample padded and span two documents;
    `documents(texts)` gives the documents' token ids."""
    texts = list(texts)
    while True:
        stream, docs = stream_of(documents(texts))
        last = docs[(len(stream) - 2) // L * L:]
        if len(last) < L + 1 and last[0] != last[-1]:
            return texts
        texts.append("Fare well.")


def test_packed_documents_get_one_eos_and_padding_continues_the_last_document(tmp_path, llama_dir, tokenizer,
                                                                               corpus_texts):
    eos = tokenizer.eos_token_id

    def documents(texts: list[str]) -> list[list[int]]:
        encoded = [tokenizer(t)["input_ids"] for t in texts if t.strip()]  # rows without text are skipped
        # This tokenizer adds BOS and no EOS: the build appends one to each document.
        assert all(ids[0] == tokenizer.bos_token_id and eos not in ids for ids in encoded)
        return [ids + [eos] for ids in encoded]

    texts = padded_across_documents(["", corpus_texts[0], " \n ", *corpus_texts[1:3]], documents)
    manifest, arrays, _ = build(llama_dir, texts, tmp_path)
    check_packed(arrays, manifest, *stream_of(documents(texts)), eos)


def test_no_second_eos_after_a_tokenizer_that_appends_one(tmp_path, eos_teacher, corpus_texts):
    tokenizer = AutoTokenizer.from_pretrained(eos_teacher)
    eos = tokenizer.eos_token_id

    def documents(texts: list[str]) -> list[list[int]]:
        encoded = [tokenizer(t)["input_ids"] for t in texts]
        assert all(ids[-1] == eos and eos not in ids[:-1] and ids[0] != tokenizer.bos_token_id for ids in encoded)
        return encoded  # as the tokenizer gives them: one EOS each

    texts = padded_across_documents(corpus_texts[:3], documents)
    manifest, arrays, _ = build(eos_teacher, texts, tmp_path)
    check_packed(arrays, manifest, *stream_of(documents(texts)), eos)


def test_unpacked_rows_skip_one_token_documents_and_cut_long_ones(tmp_path, bare_teacher, corpus_texts):
    """Row i is not document i: a text that is just the EOS string is the lone token [EOS] with this tokenizer (no
    BOS), which has no target and gets no row; a whitespace row is skipped as having no text."""
    tokenizer = AutoTokenizer.from_pretrained(bare_teacher)
    eos = tokenizer.eos_token_id
    long_text = next(t for t in corpus_texts if len(tokenizer(t)["input_ids"]) > 2 * L)
    texts = ["Hello world.", tokenizer.eos_token, long_text, "   ", "Fare well."]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    assert encoded[1] == [eos] and all(eos not in ids for ids in encoded[:1] + encoded[2:])
    manifest, arrays, _ = build(bare_teacher, texts, tmp_path, pack=False)

    # Rows 1 and 3 give no sample; row 2 is cut after L + 1 tokens, so without its EOS.
    kept = [encoded[0] + [eos], encoded[2][: L + 1], encoded[4] + [eos]]
    assert arrays["input_ids"].shape == (3, L + 1) and manifest["totals"]["samples"] == 3
    for row, ids in enumerate(kept):
        np.testing.assert_array_equal(arrays["input_ids"][row], ids + [eos] * (L + 1 - len(ids)))
        np.testing.assert_array_equal(arrays["attention_mask"][row], np.arange(L + 1) < len(ids))
        np.testing.assert_array_equal(arrays["loss_mask"][row], np.arange(1, L + 1) < len(ids))
    assert (arrays["segment_ids"] == 0).all()


# --- fingerprints --------------------------------------------------------------------------------------------------


def json_sha256(value) -> str:
    """FORMAT.md's `json(x)`: json.dumps with sorted keys and str() for what JSON cannot hold, UTF-8, SHA-256."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_sha256_by_the_spec(model: Path) -> str:
    """FORMAT.md's recipe, written out with hashlib alone."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in model.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        data = (model / name).read_bytes()
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data[:MIB])
        digest.update(data[max(len(data) - MIB, 0):])
    return digest.hexdigest()


def test_manifest_fingerprints_follow_their_recipes(tmp_path, llama_dir, tokenizer, corpus_texts):
    manifest, _, data = build(llama_dir, corpus_texts[:2], tmp_path)
    teacher = manifest["teacher"]
    assert teacher["weights_sha256"] == weights_sha256_by_the_spec(llama_dir)
    assert teacher["tokenizer_sha256"] == json_sha256(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map})
    config = AutoConfig.from_pretrained(llama_dir).to_dict()
    assert teacher["config_sha256"] == json_sha256({k: v for k, v in config.items() if k not in VOLATILE})
    loaded = datasets.load_dataset("json", data_files={"train": str(data)}, split="train")
    assert manifest["dataset"]["fingerprint"] == loaded._fingerprint


def test_weights_fingerprint_reads_names_sizes_and_both_ends_of_each_file(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    big = model / "model-00001.safetensors"
    big.write_bytes(rng.bytes(3 * MIB))
    (model / "extra.bin").write_bytes(rng.bytes(100))  # smaller than 1 MiB: hashed whole, twice
    (model / "config.json").write_text("{}")
    (model / "sub" / "other.safetensors").write_bytes(rng.bytes(10))
    first = weights_fingerprint(model)
    assert first == weights_sha256_by_the_spec(model)

    def flipped(offset: int) -> str:
        data = bytearray(big.read_bytes())
        data[offset] ^= 0xFF
        big.write_bytes(bytes(data))
        return weights_fingerprint(model)

    assert flipped(3 * MIB // 2) == first  # the middle of a file is not read
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "other.safetensors").write_bytes(b"changed")
    assert weights_fingerprint(model) == first  # nor other files, nor subdirectories
    assert flipped(3 * MIB - 1) != first  # the last MiB is
    assert weights_fingerprint(model) == weights_sha256_by_the_spec(model)
    assert weights_fingerprint(tmp_path / "no-such-dir") is None


# --- which distribution --------------------------------------------------------------------------------------------


def test_a_bfloat16_teacher_stores_the_float32_head_of_its_bfloat16_body(tmp_path, llama_dir, corpus_texts):
    """FORMAT.md, "Which distribution the targets describe". The targets match the bfloat16 body's final hidden
    states through the head in float64 far better than either the bfloat16 model's own logits (its head in bfloat16)
    or the float32 model's: medians, so that a bfloat16 rounding step that a recomputation with other kernels lands
    on differently at a few positions cannot decide the test."""
    manifest, arrays, _ = build(llama_dir, corpus_texts[:20], tmp_path, dtype="bfloat16", max_samples=8)
    assert (manifest["teacher"]["dtype"], manifest["teacher"]["head_dtype"]) == ("bfloat16", "float32")
    ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))
    mask = arrays["loss_mask"]
    bf16 = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = bf16.model(input_ids=ids[:, :-1]).last_hidden_state
        logits = {"float32 head": hidden.double() @ bf16.lm_head.weight.double().T,
                  "bfloat16 head": bf16(input_ids=ids[:, :-1]).logits.double(),
                  "float32 model": fp32(input_ids=ids[:, :-1]).logits.double()}
    errors = {}
    for name, logit in logits.items():
        logp = logit.log_softmax(-1)
        true = logp.gather(-1, ids[:, 1:, None])[..., 0].numpy()
        entropy = -(logp.exp() * logp).sum(-1).numpy()
        errors[name] = [float(np.median(np.abs(arrays[array][mask] - ref[mask])))
                        for array, ref in (("true_logprob", true), ("entropy", entropy))]
    for other in ("bfloat16 head", "float32 model"):
        assert min(errors[other]) > 1e-3  # the precisions differ: the comparison has teeth
        for got, off in zip(errors["float32 head"], errors[other], strict=True):
            assert got < 0.1 * off, errors


# --- Parquet export ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["hybrid", "topk,sampled"])
def test_parquet_export_carries_the_manifest_header(tmp_path, llama_dir, corpus_texts, targets):
    """A hybrid store's tail draws must not look like draws from the whole distribution in Parquet: the file's
    schema metadata holds the manifest's header, read here with pyarrow and json alone."""
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:20])
    store, output = tmp_path / "store", tmp_path / "out.parquet"
    runner = CliRunner()
    result = runner.invoke(main, [
        "build", "--model", str(llama_dir), "--dataset", str(data), "--output", str(store), "--seq-len", str(L),
        "--batch-size", "4", "--samples-per-shard", "4", "--max-samples", "6", "--top-k", "8", "--samples", "32",
        "--device", "cpu", "--dtype", "float32", "--targets", targets])
    assert result.exit_code == 0, (result.output, result.exception)
    result = runner.invoke(main, ["export", str(store), str(output)])
    assert result.exit_code == 0, (result.output, result.exception)

    manifest = json.loads((store / "manifest.json").read_text())
    metadata = pq.read_schema(output).metadata
    assert metadata is not None and b"teacher_cache.manifest" in metadata, metadata
    header = json.loads(metadata[b"teacher_cache.manifest"])
    assert header["format"] == "teacher-cache" and header["format_version"] == manifest["format_version"]
    for section in ("teacher", "dataset", "build", "targets"):
        assert header[section] == manifest[section], section
    sampled = header["targets"]["sampled"]
    assert (sampled["num_draws"], header["targets"]["topk"]["k"]) == (32, 8)
    assert sampled.get("draws_from") == ("tail" if targets == "hybrid" else None)
    assert header["teacher"]["model"] == str(llama_dir) and header["teacher"]["vocab_size"] == 32000
    table = pq.read_table(output)
    assert table.num_rows == manifest["totals"]["samples"] == 6
    assert table.column("sample_index").to_pylist() == list(range(6))
