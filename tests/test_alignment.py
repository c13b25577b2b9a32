"""Character alignment of two tokenizations (storage.alignment): teacher text and spans, student tokens, chunks.

Real pairs: the Llama-2 sentencepiece tokenizer, a byte-level BPE tokenizer trained here on Shakespeare and Python
source, and SmolLM2's tokenizer when the demo holds it. `tokenizer.decode` is the independent oracle for the text
and for where a token boundary falls; hand-made tokenizations check chunks and carried masks.
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHAKESPEARE, TOKENIZER_DIR
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from storage.alignment import (
    TokenSpans,
    align,
    carry_ids,
    carry_mask,
    special_ids,
    student_tokens,
    teacher_text,
)

SMOLLM2 = REPO / ".demo" / "smollm2"
REPLACEMENT = "\ufffd"
TEXTS = [
    "Hello world",
    "  two leading spaces and trailing  ",
    " one leading space",
    "double  spaces\tand\ttabs\n\nnew lines\n",
    "def f(x):\n    if x:\n        return x  # indented\n\treturn None\n",
    "Café naïve résumé — déjà vu",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 end",
    "e\u0301 combining, ｆｕｌｌ width, Ωμέγα",
    "\n leading newline",
    "x",
]
SENTENCEPIECE = {"llama"}
NAMES = ["llama", "byte_level", pytest.param("smollm2", marks=pytest.mark.skipif(
    not SMOLLM2.exists(), reason="SmolLM2's tokenizer is not in .demo/smollm2 (the demo has not fetched it)"))]


def _train_byte_level(normalizer=None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 scheme) trained on Shakespeare and Python source; no emoji or CJK merges,
    so those characters split over single-byte tokens."""
    lines = SHAKESPEARE.read_text().splitlines()[:400]
    source = Path(textwrap.__file__).read_text().splitlines()[:400] + Path(json.__file__).read_text().splitlines()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines + source, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@functools.cache
def load(name: str):
    if name == "llama":
        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(SMOLLM2)
    return _train_byte_level()


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def boundary_offsets(tokens: TokenSpans) -> np.ndarray:
    return np.append(tokens.spans[:, 0], len(tokens.text))


def assert_partition(tokens: TokenSpans) -> None:
    """The spans are in order, contiguous and spell the text."""
    spans = tokens.spans
    assert (spans[:, 1] >= spans[:, 0]).all()
    assert (spans[1:, 0] == spans[:-1, 1]).all()
    assert len(spans) == 0 or (spans[0, 0] == 0 and spans[-1, 1] == len(tokens.text))
    assert "".join(tokens.text[a:b] for a, b in spans) == tokens.text
    assert tokens.breakable[0] and tokens.breakable[-1]


def assert_boundaries_match_decode(tokenizer, tokens: TokenSpans, lead: str = "") -> None:
    """Boundary i is where decoding the first i tokens ends: exactly at a character when breakable, else inside a
    character (the decoder shows its partial bytes as U+FFFD). `lead`: a leading space the decoder strips."""
    ids = tokens.ids.tolist()
    for i, offset in enumerate(boundary_offsets(tokens)):
        prefix = decode(tokenizer, ids[:i])
        prefix = lead + prefix if i else prefix
        if tokens.breakable[i]:
            assert prefix == tokens.text[:offset], (i, prefix)
        else:
            # (sentencepiece's byte fallback shows the whole run of byte tokens as U+FFFD, whole characters too)
            whole = prefix.rstrip(REPLACEMENT)
            assert whole != prefix and tokens.text[:offset].startswith(whole), (i, prefix)


def assert_chunks(teacher: TokenSpans, student: TokenSpans, chunks) -> None:
    """Chunks partition the text; each is spelt exactly by its teacher tokens and by its student tokens."""
    text = teacher.text
    chars = chunks.chars
    assert len(chars) == 0 and text == "" or (chars[0, 0] == 0 and chars[-1, 1] == len(text))
    assert (chars[1:, 0] == chars[:-1, 1]).all() and (chars[:, 1] > chars[:, 0]).all()
    for side, ranges in ((teacher, chunks.teacher), (student, chunks.student)):
        assert (ranges[1:, 0] >= ranges[:-1, 1]).all()  # disjoint, in order
        held = np.zeros(len(side.ids), int)
        for (a, b), (start, end) in zip(ranges, chars, strict=True):
            inside = [i for i in range(a, b) if not side.special[i]]
            assert side.spans[a, 0] == start and side.spans[b - 1, 1] == end
            assert "".join(text[side.spans[i, 0]:side.spans[i, 1]] for i in inside) == text[start:end]
            held[inside] += 1
        with_text = ~side.special & (side.spans[:, 1] > side.spans[:, 0])
        assert (held[with_text] == 1).all()


def packed(tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """Documents as a build packs them (`storage.samples.iter_documents`): each tokenized with its special tokens
    and ending with EOS. Returns the ids and each token's document number."""
    ids, docs = [], []
    for number, text in enumerate(texts):
        encoded = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        ids += encoded
        docs += [number] * len(encoded)
    return ids, docs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", TEXTS)
def test_teacher_text_reads_as_decode_and_spans_sit_on_their_characters(name, text):
    tokenizer = load(name)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    tokens = teacher_text(tokenizer, ids)
    assert tokens.text == decode(tokenizer, ids)
    assert_partition(tokens)
    assert tokens.special.tolist() == [i == tokenizer.bos_token_id for i in ids]
    assert_boundaries_match_decode(tokenizer, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_split_characters_get_unbreakable_boundaries(name):
    tokenizer = load(name)
    ids = tokenizer("a 😀 b", add_special_tokens=False)["input_ids"]
    tokens = teacher_text(tokenizer, ids)
    emoji = tokens.text.index("😀")
    holders = [i for i in range(len(ids)) if REPLACEMENT in decode(tokenizer, ids[i:i + 1])]  # partial bytes
    assert len(holders) > 1, "the emoji should be split over tokens"
    # the emoji belongs to the token that holds its last byte; the boundaries inside it cannot be cut
    *first, last = holders
    assert tokens.spans[last].tolist() == [emoji, emoji + 1]
    assert all(tokens.spans[i, 1] == emoji for i in first)
    assert not tokens.breakable[[i + 1 for i in first]].any()
    assert tokens.breakable[first[0]] and tokens.breakable[last + 1]


@pytest.mark.parametrize("name", NAMES)
def test_windows_cut_anywhere_read_as_decode(name):
    """Samples are windows of a packed stream: they start and end anywhere, inside a character or a document."""
    tokenizer = load(name)
    ids, _ = packed(tokenizer, ["emoji 😀 and 中文", "déjà\tvu", " x 👍🏽"])
    cut_characters = 0
    for k in range(len(ids)):
        for window in (ids[k:], ids[:k], ids[k:k + 7]):
            tokens = teacher_text(tokenizer, window)
            documents = np.split(np.asarray(window), np.flatnonzero(np.isin(window, special_ids(tokenizer))))
            assert tokens.text == "".join(decode(tokenizer, doc) for doc in documents)
            assert_partition(tokens)
            cut_characters += REPLACEMENT in tokens.text
    assert cut_characters  # some windows start or end inside a character


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_are_separated_by_special_tokens(name):
    tokenizer = load(name)
    ids, _ = packed(tokenizer, TEXTS[:4])
    tokens = teacher_text(tokenizer, ids)
    texts = [decode(tokenizer, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[:4]]
    assert tokens.text == "".join(texts)
    seps = {tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    assert np.flatnonzero(tokens.special).tolist() == [i for i, t in enumerate(ids) if t in seps]
    ends = np.cumsum([len(t) for t in texts]).tolist()
    assert tokens.breaks.tolist() == ([0] if ids[0] in seps else []) + ends  # SmolLM2 adds no BOS
    for i in np.flatnonzero(tokens.special):
        assert tokens.spans[i, 0] == tokens.spans[i, 1] and tokens.breakable[i] and tokens.breakable[i + 1]


def test_prefix_space_is_dropped_after_bos_only():
    """Sentencepiece's prefix space goes after BOS; a space after EOS or another special token is text."""
    tokenizer = load("llama")
    hello, world = tokenizer.convert_tokens_to_ids(["▁Hello", "▁world"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert teacher_text(tokenizer, [bos, hello, eos, bos, world]).text == "Helloworld"
    assert teacher_text(tokenizer, [hello, eos, world]).text == "Hello world"
    assert teacher_text(tokenizer, [hello, world]).text == "Hello world"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", TEXTS)
def test_student_tokens_spell_the_text(name, text):
    tokenizer = load(name)
    tokens = student_tokens(tokenizer, text)
    assert tokens.text == text
    assert tokens.ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not tokens.special.any()
    assert_partition(tokens)
    lead = " " if name in SENTENCEPIECE and text.startswith(" ") else ""  # the decoder strips a real leading space
    assert_boundaries_match_decode(tokenizer, tokens, lead)


@pytest.mark.parametrize("name", NAMES)
def test_student_tokens_break_where_told_and_read_special_strings_as_text(name):
    tokenizer = load(name)
    text = "one <|im_start|> two</s><s> three 😀 four"
    breaks = [5, 9, 30]
    tokens = student_tokens(tokenizer, text, breaks=breaks)
    assert tokens.text == text
    pieces = [text[a:b] for a, b in zip([0, *breaks], [*breaks, len(text)], strict=True)]
    expected = [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False,
                                                         split_special_tokens=True)["input_ids"]]
    assert tokens.ids.tolist() == expected
    assert set(breaks) <= set(boundary_offsets(tokens)[tokens.breakable].tolist())
    assert not np.isin(tokens.ids, special_ids(tokenizer)).any()


def test_student_tokens_refuse_a_tokenizer_that_changes_the_text():
    tokenizer = _train_byte_level(normalizers.Lowercase())
    with pytest.raises(ValueError, match="does not spell the text back") as error:
        student_tokens(tokenizer, "Hello World")
    assert "'Hello World'" in str(error.value) and "'hello world'" in str(error.value)


def test_unknown_scheme_is_refused_with_the_tokenizer_named(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["a tiny tokenizer without a decoder"] * 10,
                                  trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="byte-level .* or sentencepiece") as error:
        teacher_text(loaded, [3, 4])
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match=str(tmp_path)):
        student_tokens(loaded, "a tiny")


def spans_of(text: str, lengths: list[int], *, unbreakable=(), special=()) -> TokenSpans:
    """A hand-made tokenization: token i holds lengths[i] characters (special tokens: 0)."""
    ends = np.cumsum(lengths)
    breakable = np.ones(len(lengths) + 1, bool)
    breakable[list(unbreakable)] = False
    flags = np.zeros(len(lengths), bool)
    flags[list(special)] = True
    return TokenSpans(text=text, ids=np.arange(len(lengths)), spans=np.stack([ends - lengths, ends], axis=1),
                      breakable=breakable, special=flags)


def test_align_hand_made():
    teacher = spans_of("abcdef", [2, 1, 3])  # ab|c|def
    student = spans_of("abcdef", [1, 2, 2, 1])  # a|bc|de|f: shared cuts 0, 3, 6
    chunks = align(teacher, student)
    assert chunks.chars.tolist() == [[0, 3], [3, 6]]
    assert chunks.teacher.tolist() == [[0, 2], [2, 3]] and chunks.student.tolist() == [[0, 2], [2, 4]]
    assert chunks.teacher_chunk.tolist() == [0, 0, 1] and chunks.student_chunk.tolist() == [0, 0, 1, 1]
    coverage = chunks.coverage()
    assert (coverage.chunks, coverage.characters, coverage.longest_chunk) == (2, 6, 3)
    assert (coverage.one_to_one, coverage.teacher_single, coverage.student_single) == (0.0, 0.5, 0.0)
    assert (coverage.teacher_tokens_per_chunk, coverage.student_tokens_per_chunk) == (1.5, 2.0)
    assert carry_mask(np.array([True, False, True]), chunks).tolist() == [False, False, True, True]
    assert carry_mask(np.array([True, True, False]), chunks).tolist() == [True, True, False, False]

    same = align(teacher, teacher)
    assert same.chars.tolist() == [[0, 2], [2, 3], [3, 6]] and same.coverage().one_to_one == 1.0

    inside = spans_of("abcdef", [2, 1, 3], unbreakable=[2])  # the boundary at "c" falls inside a character
    assert align(inside, student).chars.tolist() == [[0, 6]]
    assert align(inside, student).teacher.tolist() == [[0, 3]]


def test_align_hand_made_with_special_and_empty_tokens():
    # "ab" <s> (an empty prefix token) "cd" <s> (an empty token at the end)
    teacher = spans_of("abcd", [2, 0, 0, 2, 0, 0], special=[1, 4])
    documents = np.array([0, 1, 1, 1, 2, 2])
    split = spans_of("abcd", [1, 1, 1, 1])
    chunks = align(teacher, split)
    assert chunks.chars.tolist() == [[0, 2], [2, 4]]
    assert chunks.teacher_chunk.tolist() == [0, -1, 1, 1, -1, -1]
    assert chunks.teacher.tolist() == [[0, 1], [2, 4]] and chunks.student.tolist() == [[0, 2], [2, 4]]
    assert carry_ids(documents, chunks).tolist() == [0, 0, 1, 1]
    assert carry_mask(np.array([True, False, False, True, True, True]), chunks).tolist() == [True, True] + [False] * 2

    across = spans_of("abcd", [1, 2, 1])  # a|bc|d: "bc" runs across the document boundary
    chunks = align(teacher, across)
    assert chunks.chars.tolist() == [[0, 4]] and chunks.teacher.tolist() == [[0, 4]]
    with pytest.raises(ValueError, match=r"chunk 0 .* ids \[0, 1\].*breaks=teacher.breaks"):
        carry_ids(documents, chunks)


def test_align_refuses_different_texts():
    with pytest.raises(ValueError, match="different texts"):
        align(spans_of("abc", [3]), spans_of("abd", [3]))


PAIRS = [("llama", "byte_level"), ("byte_level", "llama"),
         *(pytest.param(*pair, marks=NAMES[2].marks) for pair in
           [("smollm2", "llama"), ("llama", "smollm2"), ("byte_level", "smollm2")])]


def decoded_cuts(tokenizer, ids: list[int], text: str) -> set[int]:
    """Brute force: the offsets o where the first i tokens decode to exactly the first o characters."""
    prefixes = (decode(tokenizer, ids[:i]) for i in range(len(ids) + 1))
    return {len(prefix) for prefix in prefixes if text.startswith(prefix)}


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_chunk_boundaries_are_exactly_the_shared_cuts(teacher_name, student_name):
    teacher_tokenizer, student_tokenizer = load(teacher_name), load(student_name)
    for text in (t for t in TEXTS if not t.startswith(" ")):
        ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        teacher = teacher_text(teacher_tokenizer, ids)
        assert teacher.text == text
        student = student_tokens(student_tokenizer, text)
        chunks = align(teacher, student)
        assert_chunks(teacher, student, chunks)
        shared = decoded_cuts(teacher_tokenizer, ids, text) & decoded_cuts(student_tokenizer, student.ids.tolist(),
                                                                           text)
        assert [*chunks.chars[:, 0].tolist(), len(text)] == sorted(shared), text


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_packed_documents_align_and_carry_flags_and_document_ids(teacher_name, student_name):
    teacher_tokenizer, student_tokenizer = load(teacher_name), load(student_name)
    ids, docs = packed(teacher_tokenizer, TEXTS)
    teacher = teacher_text(teacher_tokenizer, ids)
    student = student_tokens(student_tokenizer, teacher.text, breaks=teacher.breaks)
    chunks = align(teacher, student)
    assert_chunks(teacher, student, chunks)
    coverage = chunks.coverage()
    assert coverage.characters == len(teacher.text) and 0 < coverage.one_to_one <= coverage.teacher_single <= 1

    # Each document's characters, from decoding it alone.
    lengths = [len(decode(teacher_tokenizer, teacher_tokenizer(t, add_special_tokens=False)["input_ids"]))
               for t in TEXTS]
    starts = np.cumsum([0, *lengths])
    at = student.spans[:, 0]
    assert carry_ids(np.asarray(docs), chunks).tolist() == (np.searchsorted(starts, at, side="right") - 1).tolist()
    trained = np.isin(docs, [2, 5])  # e.g. the assistant replies of a conversation
    expected = ((starts[2] <= at) & (at < starts[3])) | ((starts[5] <= at) & (at < starts[6]))
    assert carry_mask(trained, chunks).tolist() == expected.tolist()


ALPHABET = st.sampled_from(list("ab xyZ\n\t.,'(") + ["  ", "    ", "é", "ß", "中", "語", "😀", "👍🏽", "e\u0301", "—"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(ALPHABET, min_size=1, max_size=30).map("".join), st.booleans())
def test_random_strings_align_both_ways(text, llama_teaches):
    teacher_tokenizer, student_tokenizer = (load("llama"), load("byte_level"))[::1 if llama_teaches else -1]
    ids = teacher_tokenizer(text, add_special_tokens=True)["input_ids"]
    teacher = teacher_text(teacher_tokenizer, ids)
    assert teacher.text == decode(teacher_tokenizer, ids)
    assert_partition(teacher)
    student = student_tokens(student_tokenizer, teacher.text, breaks=teacher.breaks)
    assert student.text == teacher.text
    assert_partition(student)
    assert_chunks(teacher, student, align(teacher, student))
