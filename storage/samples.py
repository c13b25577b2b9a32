"""The store's samples: load a dataset, tokenize it and cut it into fixed-length samples.

This is how a build makes the samples FORMAT.md describes ("Samples and positions"), and how `student-train eval
--data` packs held-out text exactly as a build would; both phases import it from here. A sample holds seq_len + 1
tokens: the teacher reads the first seq_len, and position t's true next token is token t + 1. Packed samples follow
each other with a stride of seq_len, so consecutive samples share one token and every token of the stream is a
target exactly once. Unpacked samples hold one document each, truncated and padded. Everything here is vectorised
over tokens; Python loops run over documents at most. A document is a text, or a conversation rendered by
`storage.conversations.ChatEncoder`, whose tokens carry a trained flag (only assistant replies, as a rule).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from storage.conversations import ChatEncoder
from storage.dataset_options import DEFAULT_COLUMNS, Columns, detect_format
from storage.generated import is_generated, read_generated
from storage.rollouts import RolloutEncoder

log = logging.getLogger(__name__)

DOCS_PER_BLOCK = 1000
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
# Token ids, trained flag per token (None: all); a rollout (`storage.rollouts`) adds each token's log-prob under the
# policy that drew it (NaN: not drawn) as a third element.
Document = tuple[list[int], list[bool] | None]
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class Rows:
    """A block of samples. Legend: n samples, L seq_len.

    Attributes:
        input_ids: [n, L+1] int64 tokens (padding holds the pad id).
        attention_mask: [n, L+1] bool, true for real tokens.
        loss_mask: [n, L] bool, true where position t's target (token t+1) is real and trained on.
        segment_ids: [n, L+1] uint16, document number within the sample.
        behaviour_logprob: for rollouts (`storage.rollouts`), [n, L] float32: the log-prob token t+1 had under the
            policy that drew it, NaN where it was not drawn; None for other samples.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    behaviour_logprob: np.ndarray | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows: slice) -> Rows:
        behaviour = None if self.behaviour_logprob is None else self.behaviour_logprob[rows]
        return Rows(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], self.segment_ids[rows],
                    behaviour)

    @staticmethod
    def concat(blocks: list[Rows]) -> Rows:
        fields = ["input_ids", "attention_mask", "loss_mask", "segment_ids"]
        if blocks[0].behaviour_logprob is not None:
            fields.append("behaviour_logprob")
        return Rows(*(np.concatenate([getattr(b, f) for b in blocks]) for f in fields))


def load_text_dataset(source: str, *, split: str, text_field: str) -> datasets.Dataset:
    """Load `source` with `datasets` and check it has a non-empty text column.

    Raises:
        ValueError: a local path that does not exist, a file that is not UTF-8 text, an unknown split, a missing
            column (the available ones are named), no rows, or no text in any row.
    """
    return load_samples_dataset(source, split=split, fields=Columns(text=text_field), dataset_format="text")[0]


def load_samples_dataset(source: str, *, split: str, fields: Columns = DEFAULT_COLUMNS,
                         dataset_format: str = "auto", prompts_only: bool = False) -> tuple[datasets.Dataset, str]:
    """Load `source` with `datasets` and decide its format (`storage.dataset_options.detect_format`).

    Returns:
        The dataset and its format: `text`, `messages` or `prompt-completion`.

    Raises:
        ValueError: as `load_text_dataset`, and columns that fit no format, or several when `dataset_format` is auto.
    """
    dataset = read_dataset(source, split)
    fmt = detect_format(dataset.column_names, dataset_format, fields=fields, source=source, prompts_only=prompts_only)
    if len(dataset) == 0:
        raise ValueError(_empty(source, split))
    if fmt == "text":
        _check_text(dataset, source, split, fields.text)
    return dataset, fmt


def source_id(source: str) -> str:
    """How a manifest names a dataset: a local path made absolute, else the name as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _empty(source: str, split: str) -> str:
    return f"{source} (split {split!r}) is empty: there is nothing to build a cache from."


def read_dataset(source: str, split: str) -> datasets.Dataset:
    """The rows of `source` (a file, folder, saved dataset or generated dataset) as `datasets` reads them."""
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or path.suffix.lower() in FILE_BUILDERS
    if not path.exists() and looks_local:
        raise ValueError(f"--dataset {source}: no such file or directory.")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(_empty(source, split))
    try:
        return _load(path, source, split)
    except (datasets.exceptions.DatasetGenerationError, StopIteration, IndexError) as exc:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # the text and csv builders wrap it
            raise _not_utf8(source, exc.__cause__) from None
        # What `datasets` raises on files and folders without rows.
        raise ValueError(f"{_empty(source, split)} ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise
        raise ValueError(_empty(source, split)) from None


def _check_text(dataset: datasets.Dataset, source: str, split: str, text_field: str) -> None:
    try:
        found_text = any(map(has_text, _texts(dataset, text_field)))  # stops at the first text: one block, as a rule
    except UnicodeDecodeError as exc:  # the json builder keeps undecodable bytes: reading them fails
        raise _not_utf8(source, exc) from None
    if not found_text:
        raise ValueError(
            f"{source} (split {split!r}) has no text: column {text_field!r} is empty or whitespace in every one of "
            f"its {len(dataset)} rows. Check --text-field, or the dataset's content."
        )


def has_text(text: str | None) -> bool:
    """Whether a document holds text: not missing, empty or whitespace only (those are skipped)."""
    return bool(text) and not text.isspace()


def _texts(dataset: datasets.Dataset, text_field: str) -> Iterator[str | None]:
    for batch in dataset.iter(batch_size=DOCS_PER_BLOCK):
        yield from batch[text_field]


def _not_utf8(source: str, exc: UnicodeDecodeError) -> ValueError:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return ValueError(
        f"{source} is not UTF-8 text (byte 0x{byte} is not valid UTF-8). Convert it, e.g. `iconv -f latin1 -t utf-8 "
        f"{source} > converted{Path(source).suffix}` for Latin-1, or give the text as UTF-8 jsonl or parquet."
    )


def _load(path: Path, source: str, split: str) -> datasets.Dataset:
    if path.is_dir() and is_generated(path):  # a `teacher-cache generate` output, checked as it is read
        return read_generated(path)[0]
    if path.is_dir() and any((path / f).exists() for f in SAVED_DATASET_FILES):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has splits {sorted(dataset)}, not {split!r}; pass --split NAME.")
            dataset = dataset[split]
        return dataset
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(FILE_BUILDERS)}.")
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **extra)
    return datasets.load_dataset(str(path) if path.exists() else source, split=split)


def iter_documents(dataset: datasets.Dataset, tokenizer, text_field: str) -> Iterator[list[list[int]]]:
    """Token ids of each document with text (`has_text`), tokenized a block at a time, each ending with EOS.

    The others are skipped (their count is logged at the end of the stream): they would be samples of BOS and EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the teacher's tokenizer has no EOS token, which packing needs between documents.")
    skipped = 0
    for batch in dataset.iter(batch_size=DOCS_PER_BLOCK):
        texts = [text for text in batch[text_field] if has_text(text)]
        skipped += len(batch[text_field]) - len(texts)
        if texts:
            encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
            yield [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]
    if skipped:
        log.info("skipped %d of %d documents: empty or whitespace only", skipped, len(dataset))


def iter_rows(dataset: datasets.Dataset, tokenizer, *, text_field: str, seq_len: int, pack: bool,
              chat: ChatEncoder | RolloutEncoder | None = None) -> Iterator[Rows]:
    """Samples of seq_len + 1 tokens, in blocks, in dataset order (deterministic).

    With `chat`, the rows are conversations (`ChatEncoder`) or a generator's rollouts (`RolloutEncoder`, whose rows
    also carry `behaviour_logprob`): `loss_mask[t]` is the trained flag of token t + 1, and `chat.counts` tells, once
    the samples are read, how many were skipped, truncated or dropped. Without it, the rows are text and every real
    token is trained.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if chat is None:
        blocks = ([(ids, None) for ids in block] for block in iter_documents(dataset, tokenizer, text_field))
    else:
        blocks = chat.iter_documents(dataset, seq_len)
    drawn = chat is not None and chat.drawn
    if pack:
        yield from _packed_rows(blocks, seq_len, pad, drawn)
    else:
        yield from (_unpacked_rows(block, seq_len, pad, drawn) for block in blocks)


def _packed_rows(blocks: Iterator[list[Document]], seq_len: int, pad: int, drawn: bool) -> Iterator[Rows]:
    tokens = np.zeros(0, np.int64)
    docs = np.zeros(0, np.int64)  # running document number of each token
    trained = np.zeros(0, bool)
    # With `drawn`: each token's log-prob under its generator (NaN: not drawn), and its place in its document.
    behaviour, place = np.zeros(0, np.float32), np.zeros(0, np.int64)
    next_doc = 0
    for block in blocks:
        lengths = np.fromiter((len(doc[0]) for doc in block), np.int64, len(block))
        tokens = np.concatenate([tokens, _flat((doc[0] for doc in block), np.int64, lengths.sum())])
        docs = np.concatenate([docs, np.repeat(np.arange(next_doc, next_doc + len(block)), lengths)])
        trained = np.concatenate([trained, _trained([doc[1] for doc in block], lengths)])
        if drawn:
            behaviour = np.concatenate([behaviour, _flat((doc[2] for doc in block), np.float32, lengths.sum())])
            place = np.concatenate([place, np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths,
                                                                                 lengths)])
        next_doc += len(block)
        num_rows = (len(tokens) - 1) // seq_len
        if num_rows:
            index = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len + 1)
            yield _rows(tokens[index], docs[index], np.ones(index.shape, bool), trained[index],
                        _whole_context(behaviour[index], place[index]) if drawn else None)
            rest = slice(num_rows * seq_len, None)
            tokens, docs, trained = tokens[rest], docs[rest], trained[rest]
            behaviour, place = behaviour[rest], place[rest]
    if len(tokens) > 1:  # a last, partial sample, padded
        real = np.arange(seq_len + 1) < len(tokens)
        yield _rows(_pad(tokens, seq_len + 1, pad)[None], _pad(docs, seq_len + 1, docs[-1])[None], real[None],
                    _pad(trained, seq_len + 1, False)[None],
                    _whole_context(_pad(behaviour, seq_len + 1, np.nan)[None], _pad(place, seq_len + 1, 0)[None])
                    if drawn else None)


def _whole_context(behaviour: np.ndarray, place: np.ndarray) -> np.ndarray:
    """Behaviour log-probs [n, L+1] with NaN on the tokens of a document that began in an earlier sample: the
    generator drew them after the document's whole start, which this sample no longer holds, so the teacher and the
    student see them in another context than the one they were drawn in."""
    return np.where(place > np.arange(place.shape[1]), np.float32(np.nan), behaviour)


def _unpacked_rows(block: list[Document], seq_len: int, pad: int, drawn: bool) -> Rows:
    width = seq_len + 1
    lengths = np.fromiter((min(len(doc[0]), width) for doc in block), np.int64, len(block))
    real = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(block), width), pad, np.int64)
    ids[real] = _flat((doc[0][:width] for doc in block), np.int64, lengths.sum())
    trained = np.zeros_like(real)
    trained[real] = _trained([doc[1] if doc[1] is None else doc[1][:width] for doc in block], lengths)
    behaviour = None
    if drawn:
        behaviour = np.full((len(block), width), np.nan, np.float32)
        behaviour[real] = _flat((doc[2][:width] for doc in block), np.float32, lengths.sum())
    keep = lengths > 1  # a one-token document has no target
    return _rows(ids[keep], np.zeros_like(ids[keep]), real[keep], trained[keep],
                 None if behaviour is None else behaviour[keep])


def _trained(flags: list[list[bool] | None], lengths: np.ndarray) -> np.ndarray:
    """The trained flag of each token of the documents; text documents (flags None) are trained throughout."""
    if all(doc is None for doc in flags):
        return np.ones(lengths.sum(), bool)
    return _flat(flags, bool, lengths.sum())


def _flat(lists: Iterator[list], dtype: type, count: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype, count)


def _rows(ids: np.ndarray, docs: np.ndarray, real: np.ndarray, trained: np.ndarray,
          behaviour: np.ndarray | None = None) -> Rows:
    return Rows(
        input_ids=ids,
        attention_mask=real,
        loss_mask=trained[:, 1:].copy(),  # false on padding
        segment_ids=(docs - docs[:, :1]).astype(np.uint16),
        behaviour_logprob=None if behaviour is None else behaviour[:, 1:].copy(),  # position t: token t + 1
    )


def _pad(values: np.ndarray, width: int, fill: int) -> np.ndarray:
    return np.concatenate([values, np.full(width - len(values), fill, values.dtype)])
