"""Conversations as samples: dataset shapes, chat templates and the per-token mask of what is trained.

A build reads one of three dataset shapes (`storage.dataset_options.detect_format`): plain `text` (handled by
`storage.samples` alone), `messages` (a list of `{role, content}` turns, with optional `tool_calls`, as in the OpenAI
and Hugging Face chat format) or `prompt` + `completion` (each a string or a list of messages). `ChatEncoder`
renders each conversation with a chat template and returns its tokens with a flag per token that says whether the
token is trained on; `storage.samples.iter_rows` then cuts these documents into samples, where `loss_mask[t]` is the
flag of token t + 1.

Which tokens belong to an assistant reply: with a template that marks them (`{% generation %}`), transformers'
`return_assistant_tokens_mask`; otherwise the reply is the text between the rendering of the turns before it (with
the generation prompt, so the assistant header is not trained) and the rendering that includes it, and a token is
trained when it starts inside that text. Assistant turns that call tools (`tool_calls`) are never trained, nor are
system, user and tool turns.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import jinja2
import numpy as np

from storage.dataset_options import DEFAULT_COLUMNS, OVERLONG, TRAIN_ON, Columns

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ROWS_PER_BLOCK = 1000
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers recognises the markers
Document = tuple[list[int], list[bool]]  # token ids, trained flag of each token


@dataclass(kw_only=True)
class ChatConfig:
    """How conversations become documents.

    Attributes:
        train_on: which tokens are targets: `assistant` (every assistant turn that calls no tool), `all` (every
            token), `completion` (the completion's assistant turns; for `messages` rows the last assistant turn),
            `last-assistant` (the final assistant turn that calls no tool).
        chat_template: a Jinja chat template's text; None: the tokenizer's own.
        overlong: a conversation longer than seq_len + 1 tokens is cut to its first seq_len + 1 (`truncate`) or
            skipped (`drop`).
        strict: refuse a conversation with no trained assistant turn instead of skipping it.
    """

    train_on: str = "assistant"
    chat_template: str | None = None
    overlong: str = "truncate"
    strict: bool = False

    def __post_init__(self) -> None:
        for flag, value, choices in (("--train-on", self.train_on, TRAIN_ON), ("--overlong", self.overlong, OVERLONG)):
            if value not in choices:
                raise ValueError(f"{flag} {value!r}: expected one of {', '.join(choices)}.")


@dataclass
class ChatCounts:
    """What became of the conversations read, for a build's summary."""

    encoded: int = 0
    skipped: int = 0  # no trained assistant turn
    truncated: int = 0
    dropped: int = 0


def template_sha256(template: str) -> str:
    """The SHA-256 of a chat template's text (UTF-8), as the manifest records it."""
    return hashlib.sha256(template.encode()).hexdigest()


def tokenizer_template(tokenizer) -> str | None:
    """The chat template a tokenizer renders conversations with (its default one, if it has several), or None."""
    return None if tokenizer.chat_template is None else tokenizer.get_chat_template()


def resolve_template(tokenizer, template: str | None) -> str:
    """`template` when given, else the tokenizer's chat template.

    Raises:
        ValueError: neither exists.
    """
    found = template if template is not None else tokenizer_template(tokenizer)
    if found is None:
        raise ValueError("the tokenizer has no chat template, which conversations need; pass --chat-template FILE "
                         "with a Jinja chat template for this model, or read the dataset as --format text.")
    return found


def conversation_of(row: dict, fmt: str, index: int, columns: list[str], fields: Columns = DEFAULT_COLUMNS
                    ) -> tuple[list[dict], int]:
    """A row's messages, and the index of its completion's first message (0 for `messages` rows); `fields` names the
    columns the format reads, `columns` are the dataset's (for messages).

    Keys holding null (what a dataset's shared schema adds to messages that lack them) are removed.

    Raises:
        ValueError: the row lacks the format's columns (null), or a message is not valid (`check_messages`).
    """
    parts = [row[c] for c in fields.of(fmt)]
    if any(part is None or part == [] for part in parts):
        raise ValueError(f"row {index} has no {' or '.join(fields.of(fmt))} (null or empty), but the dataset is "
                         f"read as {fmt} (columns: {', '.join(columns)}): one dataset must hold one format. Split it, "
                         "or fill or remove that row.")
    if fmt == "messages":
        prompt, completion = parts[0], []
    else:  # a string is one user turn (prompt) or one assistant turn (completion)
        prompt, completion = (_turns(part, role) for part, role in zip(parts, ("user", "assistant"), strict=True))
    messages = [{key: value for key, value in m.items() if value is not None} for m in prompt + completion]
    check_messages(messages, index)
    return messages, 0 if fmt == "messages" else len(prompt)


def _turns(part: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": part}] if isinstance(part, str) else part


def check_messages(messages: list[dict], index: int) -> None:
    """Refuse unknown roles and empty content (allowed only in an assistant turn that calls tools)."""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"row {index}, message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}. "
                             "Rename the role in the dataset.")
        if (not content or content.isspace()) and not (role == "assistant" and calls_tool(message)):
            raise ValueError(f"row {index}, message {i} ({role}) has empty content; remove the message or the row, "
                             "or give it text.")


def calls_tool(message: dict) -> bool:
    return bool(message.get("tool_calls"))


def trained_turns(messages: list[dict], train_on: str, completion_start: int) -> list[int] | None:
    """Indices of the messages trained on; None for every token (`all`). Tool calls are never trained.

    `completion_start` is the index of a prompt-completion row's first completion message, 0 for `messages` rows
    (whose `completion` is their last assistant turn).
    """
    if train_on == "all":
        return None
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not calls_tool(m)]
    if train_on == "assistant":
        return replies
    if train_on == "completion" and completion_start > 0:
        return [i for i in replies if i >= completion_start]
    return replies[-1:]


def _blocks(dataset: datasets.Dataset) -> Iterator[tuple[int, list[dict]]]:
    """The dataset's rows as dicts, a block at a time, with the index of each block's first row."""
    start = 0
    for batch in dataset.iter(batch_size=ROWS_PER_BLOCK):
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        yield start, rows
        start += len(rows)


def encoder_for(options, fmt: str, template: str | None, tokenizer) -> ChatEncoder | None:
    """The encoder of a dataset of format `fmt` read with `options` (a config with the option groups of
    `storage.dataset_options`) and the chat template `template` (None: the tokenizer's); None for text."""
    if fmt == "text":
        return None
    chat = ChatConfig(train_on=options.train_on, chat_template=template, overlong=options.overlong,
                      strict=options.strict)
    return ChatEncoder(tokenizer, chat, fmt, options.columns)


class ChatEncoder:
    """Turns the rows of a `messages` or `prompt-completion` dataset into documents with trained flags.

    `counts` tallies the conversations encoded, skipped, truncated and dropped so far.
    """

    drawn = False  # its documents carry no behaviour log-probs (a `storage.rollouts.RolloutEncoder`'s may)

    def __init__(self, tokenizer, config: ChatConfig, fmt: str, fields: Columns = DEFAULT_COLUMNS) -> None:
        assert fmt in ("messages", "prompt-completion"), fmt
        if tokenizer.eos_token_id is None:
            raise ValueError("the teacher's tokenizer has no EOS token, which packing needs between documents.")
        self.tokenizer, self.config, self.format, self.fields = tokenizer, config, fmt, fields
        self.template = resolve_template(tokenizer, config.chat_template)
        self.marked = GENERATION_TAG.search(self.template) is not None
        if not (self.marked or config.train_on == "all" or tokenizer.is_fast):
            raise ValueError("aligning assistant replies to tokens needs a fast tokenizer (offsets), and this one is "
                             "slow; give a chat template with {% generation %} markers, or --train-on all.")
        self.counts = ChatCounts()

    def manifest_entry(self) -> dict:
        """The choices to record in the manifest's `dataset` section."""
        return {"format": self.format, "columns": list(self.fields.of(self.format)), "train_on": self.config.train_on,
                "overlong": self.config.overlong, "chat_template_sha256": template_sha256(self.template)}

    def iter_documents(self, dataset: datasets.Dataset, seq_len: int) -> Iterator[list[Document]]:
        """Documents of the rows, a block at a time, each ending with EOS (an appended EOS is not trained).

        Every row is checked first (`check`), so that a bad one stops a build before it writes anything.
        """
        self.check(dataset)
        for start, rows in _blocks(dataset):
            documents = (self.document(row, start + i, seq_len, dataset.column_names) for i, row in enumerate(rows))
            yield [doc for doc in documents if doc is not None]
        c = self.counts
        log.info("conversations: %d encoded, %d skipped (no trained assistant turn), %d truncated and %d dropped "
                 "(longer than %d tokens)", c.encoded, c.skipped, c.truncated, c.dropped, seq_len + 1)

    def check(self, dataset: datasets.Dataset) -> None:
        """Raise the error of the first row that cannot be encoded: bad messages, a template that fails on it or
        cannot be aligned with it, no reply with `strict`. Renders every row; tokenizes only with generation markers.
        """
        for start, rows in _blocks(dataset):
            for index, row in enumerate(rows, start):
                messages, turns = self._conversation(row, index, dataset.column_names)
                if turns is None:
                    self._render(messages, index)
                elif turns and self.marked:
                    self._marked(messages, turns, index)
                elif turns:
                    self._spans(self._render(messages, index), messages, turns, index)

    def _conversation(self, row: dict, index: int, columns: list[str]) -> tuple[list[dict], list[int] | None]:
        """A row's messages and trained turns (`trained_turns`)."""
        messages, completion_start = conversation_of(row, self.format, index, columns, self.fields)
        turns = trained_turns(messages, self.config.train_on, completion_start)
        if turns == [] and self.config.strict:
            raise ValueError(f"row {index} has no assistant turn to train on (--train-on {self.config.train_on}); "
                             "remove the row, or drop --strict to skip such rows.")
        return messages, turns

    def document(self, row: dict, index: int, seq_len: int, columns: list[str]) -> Document | None:
        """A row's document, or None when it is skipped (no trained turn) or dropped (too long)."""
        messages, turns = self._conversation(row, index, columns)
        if turns == []:
            self.counts.skipped += 1
            return None
        ids, trained = self.encode(messages, turns, index)
        if len(ids) > seq_len + 1:
            if self.config.overlong == "drop":
                self.counts.dropped += 1
                return None
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            self.counts.truncated += 1
        self.counts.encoded += 1
        eos = self.tokenizer.eos_token_id
        return (ids, trained) if ids[-1] == eos else (ids + [eos], trained + [False])

    def encode(self, messages: list[dict], turns: list[int] | None, index: int) -> Document:
        """The tokens of a conversation rendered with the template, and which of them belong to `turns`."""
        if turns is None:
            ids = self._tokenize(self._render(messages, index), offsets=False)["input_ids"]
            return ids, [True] * len(ids)
        return self._marked(messages, turns, index) if self.marked else self._aligned(messages, turns, index)

    def _apply(self, messages: list[dict], index: int, **options):
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **options)
        except jinja2.TemplateError as exc:
            raise ValueError(f"row {index}: the chat template failed on it ({exc}); fix the row, or give a template "
                             "that accepts it with --chat-template FILE.") from None

    def _render(self, messages: list[dict], index: int, generation_prompt: bool = False) -> str:
        return self._apply(messages, index, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str, offsets: bool):
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)  # the template writes BOS

    def _aligned(self, messages: list[dict], turns: list[int], index: int) -> Document:
        """Flags from the character span of each trained turn, found by rendering the turns before it. A turn's
        training ends with its EOS token (a chat model's end of turn): what the template writes after it (a newline
        in ChatML) separates turns and is not the model's to generate."""
        full = self._render(messages, index)
        encoded = self._tokenize(full, offsets=True)
        starts = np.array([start for start, _ in encoded["offset_mapping"]], np.int64)
        is_eos = np.array(encoded["input_ids"]) == self.tokenizer.eos_token_id
        trained = np.zeros(len(starts), bool)
        for begin, end in self._spans(full, messages, turns, index):
            inside = np.flatnonzero((starts >= begin) & (starts < end))
            ends = inside[is_eos[inside]]
            trained[inside[inside <= ends[-1]] if len(ends) else inside] = True
        return encoded["input_ids"], trained.tolist()

    def _spans(self, full: str, messages: list[dict], turns: list[int], index: int) -> list[tuple[int, int]]:
        return [self._span(full, messages, turn, index) for turn in turns]

    def _span(self, full: str, messages: list[dict], turn: int, index: int) -> tuple[int, int]:
        """The characters of `full` that message `turn` adds after the generation prompt."""
        if turn == 0:
            raise ValueError(f"row {index} opens with an assistant turn, whose header cannot be told apart from its "
                             "reply; start the conversation with a system or user turn, or give a template with "
                             "{% generation %} markers via --chat-template FILE, or --train-on all.")
        before = self._render(messages[:turn], index, generation_prompt=True)
        through = self._render(messages[: turn + 1], index)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                f"row {index}, message {turn}: the chat template cannot be aligned: rendering the turns up to this "
                "reply does not give the start of the whole conversation, so the reply's tokens cannot be found. "
                "Give a template with {% generation %} markers around assistant replies via --chat-template FILE, "
                "or --train-on all.")
        return len(before), len(through)

    def _marked(self, messages: list[dict], turns: list[int], index: int) -> Document:
        """Flags from the template's `{% generation %}` blocks: one per assistant turn, or per reply without tools."""
        encoded = self._apply(messages, index, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        mask = np.array(encoded["assistant_masks"], bool)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
        blocks = edges.reshape(-1, 2)  # [start, end) of each run of marked tokens
        every = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        replies = [i for i in every if not calls_tool(messages[i])]
        owners = every if len(blocks) == len(every) else replies
        if len(blocks) != len(owners):
            raise ValueError(f"row {index}: the chat template marks {len(blocks)} {{% generation %}} blocks for "
                             f"{len(every)} assistant turns ({len(replies)} without tool calls); give a template "
                             "whose generation block holds each assistant turn once (--chat-template FILE), or "
                             "--train-on all.")
        trained = np.zeros(len(mask), bool)
        for (begin, end), turn in zip(blocks, owners, strict=True):
            trained[begin:end] = turn in turns
        return list(encoded["input_ids"]), trained.tolist()
