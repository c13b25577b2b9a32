"""Input pipeline: loading text datasets, tokenizing and cutting them into samples, batching by shard.

Every expectation is built here, independently of `storage.samples`: the token stream straight from the
tokenizer, hand-written arrays for a character tokenizer whose ids we know, and batch partitions computed from
the shard arithmetic.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from conftest import TOKENIZER_DIR, write_jsonl
from transformers import AutoTokenizer

from storage import samples as data
from storage.dataset_options import Columns
from storage.samples import Rows, iter_rows, load_samples_dataset, load_text_dataset
from teacher_cache.build import iter_batches


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tok.pad_token_id is None and tok.eos_token_id == 2  # so padding holds EOS, which the tests expect
    return tok


class CharTokenizer:
    """Hand-checkable tokenizer: id = ord(char), no special tokens added, EOS = 1, PAD = 0."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def collect(blocks) -> dict[str, np.ndarray]:
    blocks = list(blocks)
    assert all(isinstance(b, Rows) for b in blocks)
    return {name: np.concatenate([getattr(b, name) for b in blocks])
            for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids")}


def stream_of(tokenizer, texts) -> tuple[list[int], list[int], list[bool]]:
    """The packed stream tokenizer(doc) + [eos] for every doc, each token's document, and document starts."""
    tokens, docs, starts = [], [], []
    for d, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        tokens += ids
        docs += [d] * len(ids)
        starts += [True] + [False] * (len(ids) - 1)
    return tokens, docs, starts


# ------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("docs_per_block", [7, 1000])
@pytest.mark.parametrize("seq_len", [32, 61])
def test_packing_reproduces_the_token_stream(tokenizer, corpus_texts, monkeypatch, docs_per_block, seq_len):
    """Samples with stride L reassemble the stream exactly, share one token, pad only the last sample."""
    monkeypatch.setattr(data, "DOCS_PER_BLOCK", docs_per_block)  # 7: documents carried across tokenizer blocks
    texts = corpus_texts[:60]
    stream, doc_of, doc_start = stream_of(tokenizer, texts)
    L = seq_len
    assert (len(stream) - 1) % L != 0, "the case must end with a partial sample"

    rows = collect(iter_rows(datasets.Dataset.from_dict({"text": texts}), tokenizer, text_field="text",
                             seq_len=L, pack=True))
    ids, attn, loss, seg = rows["input_ids"], rows["attention_mask"], rows["loss_mask"], rows["segment_ids"]
    n = len(ids)
    assert ids.shape == (n, L + 1) and loss.shape == (n, L) and seg.shape == (n, L + 1)
    assert n == -(-(len(stream) - 1) // L)

    # Concatenating with stride L: every sample gives input_ids[:L], the last one all its real tokens.
    rebuilt = [int(t) for row in ids[:-1] for t in row[:L]] + [int(t) for t in ids[-1][attn[-1]]]
    assert rebuilt == stream
    np.testing.assert_array_equal(ids[:-1, L], ids[1:, 0])  # consecutive samples share one token

    # Only the last sample is padded: its real tokens are a prefix, then EOS (the pad) with the mask off.
    assert attn[:-1].all()
    real = len(stream) - (n - 1) * L
    np.testing.assert_array_equal(attn[-1], np.arange(L + 1) < real)
    assert (ids[-1, real:] == tokenizer.eos_token_id).all()
    np.testing.assert_array_equal(loss, attn[:, 1:])
    assert loss[-1].sum() == real - 1

    # Segment ids: the document number within the sample, +1 exactly at each document start.
    for i in range(n):
        positions = np.arange(i * L, min(i * L + L + 1, len(stream)))
        expected = np.array([doc_of[p] - doc_of[positions[0]] for p in positions])
        np.testing.assert_array_equal(seg[i, : len(positions)], expected)
        steps = np.diff(seg[i, : len(positions)].astype(np.int64))
        np.testing.assert_array_equal(steps, [int(doc_start[p]) for p in positions[1:]])


def test_packing_hand_made():
    """Hand-written samples for a stream of 13 tokens: 'abc', '' (skipped: no text), 'de', 'fghij'."""
    dataset = datasets.Dataset.from_dict({"text": ["abc", "", "de", "fghij"]})
    # stream: a b c E | d e E | f g h i j E  (E = 1), documents 0 0 0 0 1 1 1 2 2 2 2 2 2
    rows = collect(iter_rows(dataset, CharTokenizer(), text_field="text", seq_len=4, pack=True))
    T = True
    np.testing.assert_array_equal(rows["input_ids"], [
        [97, 98, 99, 1, 100],
        [100, 101, 1, 102, 103],
        [103, 104, 105, 106, 1],
    ])
    np.testing.assert_array_equal(rows["attention_mask"], [[T] * 5] * 3)
    np.testing.assert_array_equal(rows["loss_mask"], [[T] * 4] * 3)
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])

    # 13 tokens = 1 x 12 + 1: one full sample covers every target; the one token left over is no sample.
    rows = collect(iter_rows(dataset, CharTokenizer(), text_field="text", seq_len=12, pack=True))
    np.testing.assert_array_equal(rows["input_ids"], [[97, 98, 99, 1, 100, 101, 1, 102, 103, 104, 105, 106, 1]])
    assert rows["attention_mask"].all() and rows["loss_mask"].all()
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]])


# ---------------------------------------------------------------------------------------------- no packing


def test_unpacked_one_document_per_sample(tokenizer, corpus_texts):
    """One document per sample, truncated to L+1 tokens, padded with EOS, segment ids all 0."""
    texts = corpus_texts[:40]
    L = 24
    rows = collect(iter_rows(datasets.Dataset.from_dict({"text": texts}), tokenizer, text_field="text",
                             seq_len=L, pack=False))
    expected = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert len(rows["input_ids"]) == len(texts)
    assert any(len(e) > L + 1 for e in expected) and any(len(e) < L + 1 for e in expected)
    for i, tokens in enumerate(expected):
        tokens = tokens[: L + 1]
        padded = tokens + [tokenizer.eos_token_id] * (L + 1 - len(tokens))
        np.testing.assert_array_equal(rows["input_ids"][i], padded)
        np.testing.assert_array_equal(rows["attention_mask"][i], np.arange(L + 1) < len(tokens))
        np.testing.assert_array_equal(rows["loss_mask"][i], np.arange(1, L + 1) < len(tokens))
    assert (rows["segment_ids"] == 0).all()


def test_unpacked_hand_made_drops_one_token_documents():
    dataset = datasets.Dataset.from_dict({"text": ["abc", "", "de", "fghij", "k", ""]})
    rows = collect(iter_rows(dataset, CharTokenizer(), text_field="text", seq_len=4, pack=False))
    T, F = True, False
    np.testing.assert_array_equal(rows["input_ids"], [
        [97, 98, 99, 1, 0],  # abc + EOS, padded with PAD = 0
        [100, 101, 1, 0, 0],  # "" is only EOS: no target, dropped
        [102, 103, 104, 105, 106],  # truncated to L+1 = 5 tokens (its EOS is cut)
        [107, 1, 0, 0, 0],  # two tokens: one target, kept
    ])
    np.testing.assert_array_equal(rows["attention_mask"], [
        [T, T, T, T, F], [T, T, T, F, F], [T] * 5, [T, T, F, F, F]])
    np.testing.assert_array_equal(rows["loss_mask"], [[T, T, T, F], [T, T, F, F], [T] * 4, [T, F, F, F]])
    assert (rows["segment_ids"] == 0).all()


# --------------------------------------------------------------------------------------------- loading

TRICKY = ['He said, "hello, world"', "tab\there; semi;colon", "line one\nline two", "ünïcødé — dash"]


@pytest.fixture(scope="module")
def texts(corpus_texts):
    return corpus_texts[:30] + TRICKY


def _jsonl(tmp_path, texts):
    return write_jsonl(tmp_path / "data.jsonl", texts)


def _json(tmp_path, texts):
    return write_jsonl(tmp_path / "data.json", texts)


def _parquet(tmp_path, texts):
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).to_parquet(str(tmp_path / "d.parquet"))
    return tmp_path / "d.parquet"


def _csv(tmp_path, texts):
    dataset = datasets.Dataset.from_dict({"n": list(range(len(texts))), "text": texts})
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    return tmp_path / "d.csv"


def _folder(tmp_path, texts):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        write_jsonl(folder / f"part-{i}.jsonl", texts[i * 12:(i + 1) * 12])
    return folder


def _saved_dataset(tmp_path, texts):
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def _saved_dataset_dict(tmp_path, texts):
    other = datasets.Dataset.from_dict({"text": ["not this split"]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}), "test": other}).save_to_disk(
        str(tmp_path / "saved_dict"))
    return tmp_path / "saved_dict"


def _txt(tmp_path, texts):
    # One paragraph per document, separated by a blank line; the file ends without a newline.
    (tmp_path / "d.txt").write_text("\n\n".join(texts))
    return tmp_path / "d.txt"


@pytest.mark.parametrize("make", [_jsonl, _json, _parquet, _csv, _folder, _saved_dataset, _saved_dataset_dict, _txt])
def test_load_text_dataset_formats(tmp_path, texts, make):
    """The same documents, in order, from every supported kind of source."""
    assert len(texts) == 34 and all("\n\n" not in t for t in texts)
    source = make(tmp_path, texts)
    dataset = load_text_dataset(str(source), split="train", text_field="text")
    assert dataset["text"] == texts


def test_load_text_dataset_dict_split(tmp_path, texts):
    source = _saved_dataset_dict(tmp_path, texts)
    assert load_text_dataset(str(source), split="test", text_field="text")["text"] == ["not this split"]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\].*'validation'"):
        load_text_dataset(str(source), split="validation", text_field="text")


def test_load_text_dataset_missing_field_names_the_columns(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: content\)"):
        load_text_dataset(str(source), split="train", text_field="text")


def test_load_text_dataset_unknown_file_type(tmp_path):
    (tmp_path / "d.xml").write_text("<text>a</text>")
    with pytest.raises(ValueError, match=r"unknown file type '\.xml'"):
        load_text_dataset(str(tmp_path / "d.xml"), split="train", text_field="text")


def _empty_jsonl(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    return tmp_path / "d.jsonl"


def _header_only_csv(tmp_path):
    (tmp_path / "d.csv").write_text("text\n")
    return tmp_path / "d.csv"


def _empty_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize("make", [_empty_jsonl, _header_only_csv, _empty_saved_dataset])
def test_load_text_dataset_empty(tmp_path, make):
    source = make(tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        load_text_dataset(str(source), split="train", text_field="text")


def test_load_samples_dataset_reads_text_as_before(tmp_path, texts):
    """Text detected from the columns: the same documents as `load_text_dataset` reads."""
    source = _jsonl(tmp_path, texts)
    dataset, fmt = load_samples_dataset(str(source), split="train")
    assert fmt == "text" and dataset["text"] == texts


def test_load_samples_dataset_columns_of_no_format(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: content\); pass --text-field.*--format"):
        load_samples_dataset(str(source), split="train")
    assert load_samples_dataset(str(source), split="train", fields=Columns(text="content"))[1] == "text"


def test_load_samples_dataset_empty_conversations(tmp_path):
    datasets.Dataset.from_dict({"messages": []}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="is empty"):
        load_samples_dataset(str(tmp_path / "saved"), split="train")


# ----------------------------------------------------------------------------------------------- batching


def numbered_rows(start: int, n: int) -> Rows:
    """n samples whose first token is their global index."""
    ids = np.zeros((n, 5), np.int64)
    ids[:, 0] = np.arange(start, start + n)
    return Rows(ids, np.ones((n, 5), bool), np.ones((n, 4), bool), np.zeros((n, 5), np.uint16))


def blocks_of(sizes: list[int]):
    start = 0
    for size in sizes:
        yield numbered_rows(start, size)
        start += size


def expected_batches(total: int, batch_size: int, per_shard: int, start: int, stop: int | None):
    """(first, size) of each batch: each shard [s, s + per_shard) cut into batch_size pieces, from start to stop."""
    end = total if stop is None else min(stop, total)
    out = []
    for shard_start in range(0, end, per_shard):
        shard_end = min(shard_start + per_shard, end)
        out += [(b, min(batch_size, shard_end - b)) for b in range(shard_start, shard_end, batch_size)]
    return [(b, n) for b, n in out if b >= start]


SIZES = {
    "one block": [28],
    "uneven blocks": [3, 7, 1, 5, 10, 2],
    "single rows": [1] * 28,
}


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("batch_size,per_shard,start,stop", [
    (4, 6, 0, None),
    (4, 6, 12, None),  # resume after two shards
    (4, 6, 6, 23),
    (3, 5, 10, 17),
    (8, 3, 0, None),  # batches larger than a shard
    (4, 8, 0, 11),  # stop at the end of a block of the uneven split (3 + 7 + 1)
    (4, 8, 8, 10),  # stop at the end of a block of the uneven split (3 + 7)
    (5, 7, 0, 100),  # stop beyond the end
])
def test_iter_batches(sizes, batch_size, per_shard, start, stop):
    """Every sample of [start, stop) once, in order, in batches cut on the shard grid whatever the blocks."""
    after = start // per_shard  # a resumed build keeps the shards after its committed ones
    batches = list(iter_batches(blocks_of(sizes), batch_size, per_shard, keep=lambda s: s >= after, stop=stop))
    got = [(first, len(batch)) for first, batch in batches]
    assert got == expected_batches(sum(sizes), batch_size, per_shard, start, stop)
    for first, batch in batches:
        np.testing.assert_array_equal(batch.input_ids[:, 0], np.arange(first, first + len(batch)))
        assert first // per_shard == (first + len(batch) - 1) // per_shard  # never crosses a shard boundary
    seen = np.concatenate([batch.input_ids[:, 0] for _, batch in batches])
    np.testing.assert_array_equal(seen, np.arange(start, min(stop or 28, 28)))
