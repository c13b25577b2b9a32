"""Character alignment of two tokenizations of one text: the base of cross-tokenizer distillation.

A store keeps the teacher's token ids. A student with another tokenizer learns from them through the text they
stand for: `teacher_text` recovers that text and each teacher token's characters, `student_tokens` tokenizes it
with the student's tokenizer, `align` cuts it into chunks where both tokenizations start and end at the same
characters, and `carry_mask` / `carry_ids` move per-token flags and document ids from the teacher's tokens to the
student's through those chunks. Losses over chunks (approximate likelihood matching) build on this module.

Both sides are read the same way: each token's string is turned back into the bytes it stands for by the
tokenizer's own scheme (byte-level BPE: GPT-2's byte-to-unicode table inverted; sentencepiece: `▁` is a space and
`<0xNN>` a byte), the bytes are decoded as UTF-8, and a token's span is the characters whose last byte it holds.
Legend: N tokens, C chunks.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass

import numpy as np

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
REPLACEMENT = "\ufffd".encode()


@dataclass(frozen=True)
class TokenSpans:
    """A tokenization of a text with the characters of each token.

    A token's span is the characters whose last UTF-8 byte it holds. Byte-level BPE may end a token inside a
    character (an emoji's four bytes over two tokens): the character then belongs to the token that completes it,
    the tokens before it that hold only its first bytes get an empty span, and the boundaries inside the character
    are not breakable. This choice keeps the spans a partition of the text (their concatenation is the text) and
    gives a token the characters a streaming decoder prints once it has read that token. Special tokens hold no
    characters: an empty span where they stand, breakable on both sides.

    Attributes:
        text: the text.
        ids: [N] int64 token ids.
        spans: [N, 2] int64 [start, end) character offsets into `text`, in order and contiguous.
        breakable: [N + 1] bool: whether the text may be cut at boundary i (before token i; i = N: the end),
            false where the boundary falls inside a character.
        special: [N] bool: special tokens (BOS, EOS, chat tokens), which separate documents and turns.
    """

    text: str
    ids: np.ndarray
    spans: np.ndarray
    breakable: np.ndarray
    special: np.ndarray

    @property
    def breaks(self) -> np.ndarray:
        """Sorted character offsets of the special tokens: where documents and turns meet."""
        return np.unique(self.spans[self.special, 0])


@dataclass(frozen=True)
class Coverage:
    """How finely two tokenizations align (shares are of the text's characters).

    Attributes:
        chunks: number of chunks.
        characters: characters of the text.
        one_to_one: share of characters in chunks of one teacher token and one student token.
        teacher_single: share of characters in chunks of a single teacher token.
        student_single: share of characters in chunks of a single student token.
        teacher_tokens_per_chunk: mean teacher tokens in a chunk.
        student_tokens_per_chunk: mean student tokens in a chunk.
        longest_chunk: characters in the longest chunk.
    """

    chunks: int
    characters: int
    one_to_one: float
    teacher_single: float
    student_single: float
    teacher_tokens_per_chunk: float
    student_tokens_per_chunk: float
    longest_chunk: int


@dataclass(frozen=True)
class Chunks:
    """Stretches of the text where both tokenizations start and end at the same characters.

    Every character lies in exactly one chunk. A token belongs to the chunk that holds its characters; a token with
    an empty span to the chunk of the character it starts (the one it helps complete, or the text after
    sentencepiece's dropped prefix space). Special tokens and empty tokens at the very end of the text belong to
    no chunk.

    Attributes:
        chars: [C, 2] int64 [start, end) character range of each chunk.
        teacher: [C, 2] int64 [a, b): the chunk's teacher tokens are a..b-1 (special tokens among them only when
            the student tokenization runs across them; `student_tokens` with `breaks` never does).
        student: [C, 2] int64 [c, d): the chunk's student tokens.
        teacher_chunk: [N_teacher] int64 chunk of each teacher token, -1 for none.
        student_chunk: [N_student] int64 chunk of each student token, -1 for none.
    """

    chars: np.ndarray
    teacher: np.ndarray
    student: np.ndarray
    teacher_chunk: np.ndarray
    student_chunk: np.ndarray

    def __len__(self) -> int:
        return len(self.chars)

    def coverage(self) -> Coverage:
        """A summary of how finely the two tokenizations align."""
        sizes = self.chars[:, 1] - self.chars[:, 0]
        total = int(sizes.sum())
        teacher = np.bincount(self.teacher_chunk[self.teacher_chunk >= 0], minlength=len(self))
        student = np.bincount(self.student_chunk[self.student_chunk >= 0], minlength=len(self))

        def share(selected: np.ndarray) -> float:
            return float(sizes[selected].sum() / total) if total else 0.0

        return Coverage(chunks=len(self), characters=total, one_to_one=share((teacher == 1) & (student == 1)),
                        teacher_single=share(teacher == 1), student_single=share(student == 1),
                        teacher_tokens_per_chunk=float(teacher.mean()) if len(self) else 0.0,
                        student_tokens_per_chunk=float(student.mean()) if len(self) else 0.0,
                        longest_chunk=int(sizes.max()) if len(self) else 0)


@dataclass(frozen=True)
class _Scheme:
    """How a tokenizer's token strings stand for bytes."""

    byte_level: bool  # GPT-2 style: every character of a token string is one byte
    byte_fallback: bool  # sentencepiece: `<0xNN>` tokens are single bytes
    prefix_space: bool  # sentencepiece prepends a space to each text it tokenizes; its decoder strips it


def special_ids(tokenizer) -> np.ndarray:
    """Sorted ids of the tokenizer's special tokens (BOS, EOS, PAD, UNK, chat tokens): they hold no text."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return np.unique(np.fromiter(itertools.chain(tokenizer.all_special_ids, added), np.int64))


def teacher_text(tokenizer, ids) -> TokenSpans:
    """The text a sequence of teacher token ids stands for, with each token's characters.

    Each document's text reads as `tokenizer.decode` of its ids (skipping special tokens, without cleaning up
    tokenization spaces). Sentencepiece prepends a space to every text it tokenizes and its decoder strips one
    leading space: the leading space of the first text token at the start of `ids` and right after each BOS
    (after each EOS for a tokenizer without BOS) is that prefix and is not text; after any other special token
    (a chat template's turn markers) a leading space is text. A sample that starts inside a document therefore
    loses one real leading space, as `tokenizer.decode` does. Bytes that are not valid UTF-8 (a sample cut inside
    a character) read as U+FFFD, as in `tokenizer.decode`.

    Args:
        tokenizer: the teacher's fast tokenizer (byte-level BPE or sentencepiece).
        ids: [N] token ids, padding removed.

    Raises:
        ValueError: the tokenizer's scheme is neither byte-level BPE nor sentencepiece.
    """
    ids = np.asarray(ids, np.int64)
    scheme = _scheme(tokenizer)
    special = np.isin(ids, special_ids(tokenizer))
    starts_document = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    pieces = []
    for begin, end in _runs(~special):
        prefixed = scheme.prefix_space and (begin == 0 or ids[begin - 1] == starts_document)
        pieces.append((begin, end, _pieces(scheme, tokens[begin:end], strip_prefix=prefixed)))
    return _assemble(ids, special, pieces)


def student_tokens(tokenizer, text: str, *, breaks=()) -> TokenSpans:
    """The student's tokenization of a text, with each token's characters; no special tokens are added.

    The spans come from the tokens' bytes, as for the teacher, not from the tokenizer's offset mapping: offsets
    are trimmed of whitespace and overlap on split characters, so they do not partition the text. Special-token
    strings inside the text are tokenized as text.

    Args:
        tokenizer: the student's fast tokenizer (byte-level BPE or sentencepiece).
        text: the text, usually `teacher_text(...).text`.
        breaks: character offsets where the text is tokenized apart, usually the teacher's `TokenSpans.breaks`,
            so that no student token, and hence no chunk, runs across a document or turn boundary.

    Raises:
        ValueError: the tokenizer's scheme is unknown, or its tokens do not spell the text back (a tokenizer that
            normalizes text or maps characters to an unknown token).
    """
    scheme = _scheme(tokenizer)
    cuts = [0, *breaks, len(text)]
    ids, pieces = [], []
    for begin, end in itertools.pairwise(cuts):
        if begin == end:
            continue
        piece = text[begin:end]
        segment = tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(segment)
        pieces.append((len(ids), len(ids) + len(segment),
                       _pieces(scheme, tokens, strip_prefix=scheme.prefix_space and not piece.startswith(" "))))
        ids.extend(segment)
    spans = _assemble(np.asarray(ids, np.int64), np.zeros(len(ids), bool), pieces)
    if spans.text != text:
        at = next((i for i, (a, b) in enumerate(zip(spans.text, text, strict=False)) if a != b),
                  min(len(text), len(spans.text)))
        raise ValueError(f"the student tokenizer {tokenizer.name_or_path!r} does not spell the text back: "
                         f"{text[at:at + 20]!r} comes back as {spans.text[at:at + 20]!r}. Aligning by characters "
                         "needs a tokenizer that neither normalizes the text nor maps characters to an unknown "
                         "token.")
    return spans


def align(teacher: TokenSpans, student: TokenSpans) -> Chunks:
    """The chunks where both tokenizations start and end at the same characters.

    The chunk boundaries are the character offsets that are a breakable token boundary in both tokenizations.

    Raises:
        ValueError: the two tokenizations are of different texts.
    """
    if teacher.text != student.text:
        raise ValueError(f"the teacher and student tokenizations are of different texts ({len(teacher.text)} and "
                         f"{len(student.text)} characters); tokenize the student with "
                         "`student_tokens(tokenizer, teacher.text)`.")
    cuts = np.intersect1d(_cut_offsets(teacher), _cut_offsets(student))
    teacher_chunk, student_chunk = _chunk_of(teacher, cuts), _chunk_of(student, cuts)
    return Chunks(chars=np.stack([cuts[:-1], cuts[1:]], axis=1), teacher=_ranges(teacher_chunk, len(cuts) - 1),
                  student=_ranges(student_chunk, len(cuts) - 1), teacher_chunk=teacher_chunk,
                  student_chunk=student_chunk)


def carry_mask(teacher_mask: np.ndarray, chunks: Chunks) -> np.ndarray:
    """A per-token flag carried from the teacher's tokens to the student's: [N_teacher] bool -> [N_student] bool.

    A student token is flagged when every teacher token of its chunk is flagged, so a student token never counts
    text the teacher's flag left out. Tokens in no chunk are not flagged. For the loss mask, pass one flag per
    token (token i is a trained target: `loss_mask[i - 1]`, false for token 0) and read the student's the same way.
    """
    member = chunks.teacher_chunk >= 0
    unflagged = np.bincount(chunks.teacher_chunk[member & ~teacher_mask], minlength=len(chunks))
    return np.where(chunks.student_chunk >= 0, unflagged[chunks.student_chunk] == 0, False)


def carry_ids(teacher_ids: np.ndarray, chunks: Chunks, *, fill: int = -1) -> np.ndarray:
    """A per-token id (a document or turn number) carried from the teacher's tokens to the student's.

    A student token gets the id of the teacher tokens of its chunk, which must all share it; tokens in no chunk
    get `fill`.

    Raises:
        ValueError: a chunk holds teacher tokens with different ids (the student tokenization ran across a document
            boundary: tokenize with `student_tokens(..., breaks=teacher.breaks)`).
    """
    member = chunks.teacher_chunk >= 0
    first = teacher_ids[chunks.teacher[:, 0]]  # [C]: a chunk's first teacher token is one of its own
    mixed = np.flatnonzero(teacher_ids[member] != first[chunks.teacher_chunk[member]])
    if len(mixed):
        chunk = chunks.teacher_chunk[member][mixed[0]]
        raise ValueError(f"chunk {chunk} (characters {chunks.chars[chunk].tolist()}) holds teacher tokens with ids "
                         f"{np.unique(teacher_ids[chunks.teacher_chunk == chunk]).tolist()}: the student tokenization "
                         "runs across a document boundary; tokenize it with "
                         "`student_tokens(tokenizer, text, breaks=teacher.breaks)`.")
    return np.where(chunks.student_chunk >= 0, first[chunks.student_chunk], fill)


def vocabulary_map(teacher, student, size: int) -> np.ndarray:
    """[size] int64: for each teacher id, the student id that stands for exactly the same bytes, -1 for none.

    Text tokens match by their bytes as they read inside a text (sentencepiece's `▁` a space, byte-level BPE's
    characters bytes). Where several student tokens stand for the same bytes (sentencepiece's `<0xNN>` beside a
    one-character piece), a byte-fallback token takes the student's byte-fallback token and any other token the
    student's other token, so that a tokenizer maps to itself one to one. Special tokens match a
    student special token of the same string, and BOS and EOS each other's; ids at or past the teacher tokenizer's
    length (padding rows of a model's embedding) map to none.
    """
    fallback_ids: dict[bytes, int] = {}
    text_ids: dict[bytes, int] = {}
    student_scheme = _scheme(student)
    student_special = set(special_ids(student).tolist())
    for token_id, token in enumerate(student.convert_ids_to_tokens(list(range(len(student))))):
        if token_id not in student_special:
            fallback = student_scheme.byte_fallback and BYTE_TOKEN.fullmatch(token) is not None
            (fallback_ids if fallback else text_ids).setdefault(_token_bytes(student_scheme, token), token_id)
    mapped = np.full(size, -1, np.int64)
    teacher_scheme = _scheme(teacher)
    teacher_special = set(special_ids(teacher).tolist())
    count = min(size, len(teacher))
    for token_id, token in enumerate(teacher.convert_ids_to_tokens(list(range(count)))):
        if token_id not in teacher_special:
            data = _token_bytes(teacher_scheme, token)
            fallback = teacher_scheme.byte_fallback and BYTE_TOKEN.fullmatch(token) is not None
            first, second = (fallback_ids, text_ids) if fallback else (text_ids, fallback_ids)
            mapped[token_id] = first.get(data, second.get(data, -1))
    for token_id, student_id in special_map(teacher, student).items():
        if token_id < size:
            mapped[token_id] = student_id
    return mapped


def special_map(teacher, student) -> dict[int, int]:
    """Teacher special token id -> the student's: the student special token of the same string, else for BOS and EOS
    the student's BOS and EOS; a teacher special token with neither is left out."""
    student_by_string = {student.convert_ids_to_tokens(int(i)): int(i) for i in special_ids(student)}
    roles = {teacher.bos_token_id: student.bos_token_id, teacher.eos_token_id: student.eos_token_id}
    mapped = {}
    for token_id in special_ids(teacher).tolist():
        student_id = student_by_string.get(teacher.convert_ids_to_tokens(token_id), roles.get(token_id))
        if student_id is not None:
            mapped[token_id] = student_id
    return mapped


def _cut_offsets(tokens: TokenSpans) -> np.ndarray:
    """Character offsets of the breakable token boundaries (0 and the text's end always among them)."""
    offsets = np.append(tokens.spans[:, 0], len(tokens.text))  # [N + 1] offset of boundary i
    return offsets[tokens.breakable]


def _chunk_of(tokens: TokenSpans, cuts: np.ndarray) -> np.ndarray:
    """[N] the chunk of each token: the one holding the character its span starts at; -1 for special tokens and
    for tokens at the end of the text."""
    chunk = np.searchsorted(cuts, tokens.spans[:, 0], side="right") - 1
    return np.where(tokens.special | (tokens.spans[:, 0] == len(tokens.text)), -1, chunk)


def _ranges(chunk_of: np.ndarray, count: int) -> np.ndarray:
    """[count, 2] [first, last + 1) token of each chunk, from each token's chunk (non-decreasing over members)."""
    members = np.flatnonzero(chunk_of >= 0)
    chunks = chunk_of[members]
    first = members[np.searchsorted(chunks, np.arange(count), side="left")]
    last = members[np.searchsorted(chunks, np.arange(count), side="right") - 1]
    return np.stack([first, last + 1], axis=1)


def _scheme(tokenizer) -> _Scheme:
    """The tokenizer's scheme, read from its decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.decoder.__getstate__()) if backend is not None and backend.decoder else {}
    steps = decoder.get("decoders", [decoder])
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        return _Scheme(byte_level=True, byte_fallback=False, prefix_space=False)
    spaces = any(step.get("type") == "Replace" and step["pattern"] == {"String": "▁"} and step["content"] == " "
                 for step in steps)
    if "Metaspace" in kinds or spaces:
        prefix = any(step.get("type") == "Metaspace" and step["prepend_scheme"] != "never"
                     or step.get("type") == "Strip" and step["content"] == " " and step["start"] >= 1
                     for step in steps)
        return _Scheme(byte_level=False, byte_fallback="ByteFallback" in kinds, prefix_space=prefix)
    raise ValueError(f"cannot tell which characters the tokens of {tokenizer.name_or_path!r} stand for: its decoder "
                     f"is {decoder or 'missing'}, expected a fast tokenizer with a byte-level (GPT-2) or sentencepiece "
                     "(Metaspace, `▁` for space) decoder. Aligning it would need the token spans kept in the store "
                     "at build time.")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level table inverted: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b if b in printable else next(shifted)): b for b in range(256)}


@functools.lru_cache(maxsize=1 << 17)
def _token_bytes(scheme: _Scheme, token: str) -> bytes:
    """The bytes a token string stands for."""
    if scheme.byte_level:
        table = _unicode_to_byte()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode()  # an added token written as plain text, as the byte-level decoder reads it
    if scheme.byte_fallback and BYTE_TOKEN.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


def _pieces(scheme: _Scheme, tokens: list[str], *, strip_prefix: bool) -> list[bytes]:
    """The bytes of each token of a run of text tokens, as the tokenizer's decoder reads them."""
    pieces = [_token_bytes(scheme, token) for token in tokens]
    if scheme.byte_fallback:
        _replace_invalid_byte_runs(pieces, tokens)
    if strip_prefix and pieces and pieces[0].startswith(b" "):
        pieces[0] = pieces[0][1:]
    return pieces


def _replace_invalid_byte_runs(pieces: list[bytes], tokens: list[str]) -> None:
    """Sentencepiece's byte fallback decodes each run of `<0xNN>` tokens at once and, when the run is not valid
    UTF-8, reads every byte of it as U+FFFD (tokenizers' `ByteFallback` decoder)."""
    is_byte = [BYTE_TOKEN.fullmatch(token) is not None for token in tokens]
    for begin, end in _runs(np.asarray(is_byte, bool)):
        try:
            b"".join(pieces[begin:end]).decode()
        except UnicodeDecodeError:
            pieces[begin:end] = [REPLACEMENT] * (end - begin)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) of each maximal run of true flags."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _assemble(ids: np.ndarray, special: np.ndarray, runs: list[tuple[int, int, list[bytes]]]) -> TokenSpans:
    """Spans of all tokens from the bytes of each run of text tokens; tokens outside the runs hold no text."""
    spans = np.zeros((len(ids), 2), np.int64)
    breakable = np.ones(len(ids) + 1, bool)
    texts, written, previous_end = [], 0, 0
    for begin, end, pieces in runs:
        spans[previous_end:begin] = written  # special tokens before this run
        text, run_spans, run_breakable = _decode(pieces)
        spans[begin:end] = run_spans + written
        breakable[begin:end + 1] = run_breakable
        texts.append(text)
        written += len(text)
        previous_end = end
    spans[previous_end:] = written
    return TokenSpans(text="".join(texts), ids=ids, spans=spans, breakable=breakable, special=special)


def _decode(pieces: list[bytes]) -> tuple[str, np.ndarray, np.ndarray]:
    """The text of a run of token bytes, each token's [start, end) characters and whether each boundary is breakable.

    Invalid UTF-8 reads as one U+FFFD per maximal invalid subsequence (Python's and Rust's lossy decoding).
    """
    data = b"".join(pieces)
    byte_offsets = np.concatenate([[0], np.cumsum([len(piece) for piece in pieces], dtype=np.int64)])
    starts = _character_starts(data)  # [B + 1]
    started = np.concatenate([[0], np.cumsum(starts[:-1])])  # [B + 1] characters that start before byte b
    completed = started - ~starts  # [B + 1] characters whose last byte is before byte b
    bounds = completed[byte_offsets]
    return (data.decode("utf-8", errors="replace"), np.stack([bounds[:-1], bounds[1:]], axis=1),
            starts[byte_offsets])


def _character_starts(data: bytes) -> np.ndarray:
    """[B + 1] bool: whether a character of the decoded text starts at byte b (b = B: the end, always)."""
    codes = np.frombuffer(data, np.uint8)
    starts = np.append((codes & 0xC0) != 0x80, True)  # UTF-8 continuation bytes are 10xxxxxx
    position = 0
    while True:
        try:
            data[position:].decode()
            return starts
        except UnicodeDecodeError as error:  # one U+FFFD for bytes [start, end)
            starts[position + error.start] = True
            starts[position + error.start + 1:position + error.end] = False
            position += error.end
