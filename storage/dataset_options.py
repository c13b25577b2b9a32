"""How a command reads a dataset: its shape, the columns that hold it, and how its conversations become samples.

Two groups of options, declared once and shared by every command that reads a dataset of text or conversations
(`teacher-cache build`, `student-train eval`, `teacher-cache generate`): a command's config dataclass inherits
`DatasetOptions` (the split, the shape and its columns) and `ConversationOptions` (the chat template,
`TemplateOptions`, what is trained, overlong conversations, and what packed documents attend to) or only
`TemplateOptions`. `detect_format` decides the shape from the columns.

Shapes: `text` (one column of text), `messages` (one column of conversations, each a list of `{role, content}`
turns) and `prompt-completion` (a prompt column and a completion column, each a string or a list of turns). The
column names default to those of the Hugging Face conventions and are options (`--text-field`, `--messages-field`,
`--prompt-field`, `--completion-field`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from storage.options import option

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "messages", "prompt-completion")
TRAIN_ON = ("assistant", "all", "completion", "last-assistant")
OVERLONG = ("truncate", "drop")
DOCUMENT_ATTENTION = ("auto", "cross", "isolated")


@dataclass(frozen=True)
class Columns:
    """The column each part of a dataset is read from."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"

    def of(self, fmt: str) -> tuple[str, ...]:
        """The columns a format reads, in order: (text,), (messages,) or (prompt, completion)."""
        return {"text": (self.text,), "messages": (self.messages,),
                "prompt-completion": (self.prompt, self.completion)}[fmt]

    def flags(self, fmt: str) -> str:
        """The options naming a format's columns, for messages: `--messages-field`."""
        names = {"text": ("text",), "messages": ("messages",), "prompt-completion": ("prompt", "completion")}[fmt]
        return " and ".join(f"--{name}-field" for name in names)


DEFAULT_COLUMNS = Columns()


def detect_format(columns: list[str], requested: str = "auto", *, fields: Columns = DEFAULT_COLUMNS,
                  source: str = "the dataset", prompts_only: bool = False) -> str:
    """The dataset's shape: `requested`, checked against the columns, or the one shape the columns fit (`auto`).
    With `prompts_only` (prompts to answer), `prompt-completion` needs the prompt column only.

    Raises:
        ValueError: an unknown format, a requested format whose columns are missing, or (`auto`) columns that fit
            no format or several.
    """
    if requested not in FORMATS:
        raise ValueError(f"--format {requested!r}: expected one of {', '.join(FORMATS)}.")
    listed = ", ".join(columns)
    if prompts_only and fields.completion not in columns:
        fields = dataclasses.replace(fields, completion=fields.prompt)
    conversational = any(c in columns for fmt in ("messages", "prompt-completion") for c in fields.of(fmt))
    if fields.text not in columns and (requested == "text" or (requested == "auto" and not conversational)):
        raise ValueError(f"{source} has no column {fields.text!r} (columns: {listed}); pass --text-field with the "
                         "column that holds the text (conversations: --messages-field, or --prompt-field and "
                         "--completion-field, with --format).")
    if requested != "auto":
        missing = [c for c in fields.of(requested) if c not in columns]
        if missing:
            raise ValueError(f"--format {requested} needs the column(s) {', '.join(missing)}, which {source} lacks "
                             f"(columns: {listed}); name the columns that hold it with {fields.flags(requested)}, or "
                             "choose the format its columns hold.")
        return requested
    shapes = [fmt for fmt in FORMATS[1:] if all(c in columns for c in fields.of(fmt))]
    if len(shapes) != 1:
        found = "several formats: " + ", ".join(shapes) if shapes else "none"
        expected = "; ".join(f"{' and '.join(map(repr, fields.of(fmt)))} ({fmt})" for fmt in FORMATS[1:])
        raise ValueError(f"{source} has the columns {listed}, which fit {found}. Expected {expected}. Name the "
                         "columns with --text-field, --messages-field, or --prompt-field and --completion-field, "
                         "and choose the shape with --format text|messages|prompt-completion.")
    log.info("dataset format: %s (from the columns %s)", shapes[0], listed)
    return shapes[0]


@dataclass(kw_only=True)
class DatasetOptions:
    """The split, shape and columns of the dataset a command reads."""

    split: str = option("train", help="Dataset split.")
    dataset_format: str = option(
        "auto", flag="--format", choices=FORMATS,
        help="The dataset's shape. text: a text column. messages: a column of conversations, each a list of {role, "
             "content} turns (system, user, assistant, tool; assistant turns may carry tool_calls), the OpenAI / "
             "Hugging Face chat format. prompt-completion: prompt and completion columns, each a string or a list of "
             "turns. auto: the one shape the columns fit (it says which). Conversations are rendered with the "
             "tokenizer's chat template (or --chat-template).")
    text_field: str = option("text", help="The column holding the text (--format text).")
    messages_field: str = option("messages", help="The column holding the conversations (--format messages).")
    prompt_field: str = option("prompt", help="The column holding the prompts (--format prompt-completion).")
    completion_field: str = option("completion",
                                   help="The column holding the completions (--format prompt-completion).")

    @property
    def columns(self) -> Columns:
        return Columns(self.text_field, self.messages_field, self.prompt_field, self.completion_field)


@dataclass(kw_only=True)
class TemplateOptions:
    """The chat template conversations are rendered with."""

    chat_template: str | None = option(
        None, metavar="FILE",
        help="A Jinja chat template file to render conversations with, instead of the tokenizer's own. With "
             "{% generation %} markers around assistant replies, the markers decide what is trained; otherwise each "
             "reply is found by rendering the conversation turn by turn.")

    def template_text(self, dataset_format: str, source: str) -> str | None:
        """The text of --chat-template (None: the tokenizer's own template).

        Raises:
            ValueError: a template for a text dataset, or a template file that does not exist.
        """
        if self.chat_template is not None and dataset_format == "text":
            raise ValueError(f"--chat-template {self.chat_template}: {source} is read as text, which has no turns to "
                             "render; pass --format messages or prompt-completion for conversations, or leave "
                             "--chat-template out.")
        return self.read_template()

    def read_template(self) -> str | None:
        """The text of the --chat-template file, or None without one.

        Raises:
            ValueError: the file does not exist.
        """
        if self.chat_template is None:
            return None
        path = Path(self.chat_template).expanduser()
        if not path.is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file; give a Jinja chat template file.")
        return path.read_text()


@dataclass(kw_only=True)
class ConversationOptions(TemplateOptions):
    """How conversations become samples: the template, the trained tokens, overlong ones, packed attention."""

    train_on: str = option(
        "assistant", choices=TRAIN_ON,
        help="Which tokens of a conversation are targets (the store's loss_mask). assistant: every assistant reply "
             "(system, user and tool turns, and assistant turns that only call tools, are masked); all: every token; "
             "completion: the completion of prompt-completion rows (the last reply of messages rows); "
             "last-assistant: the final reply only.")
    overlong: str = option(
        "truncate", choices=OVERLONG,
        help="A conversation longer than --seq-len + 1 tokens: truncate keeps its start, drop skips it (counted in "
             "the summary either way).")
    strict: bool = option(
        False, help="Refuse a conversation with nothing to train on under --train-on (instead of skipping it with a "
                    "count).")
    document_attention: str = option(
        "auto", choices=DOCUMENT_ATTENTION,
        help="What a packed document's tokens attend to. isolated: only their own document (positions restart at "
             "each document, a block-diagonal causal mask), so a document's targets are those of the document run "
             "alone; student-train then reads the store the same way. cross: every earlier token of the sample, "
             "across documents, as base models are pretrained on packed text. auto: cross for plain text, isolated "
             "for conversations. Only with --pack, and isolated only with the transformers backend.")

    def attention(self, dataset_format: str) -> str:
        """`cross` or `isolated` for a dataset of `dataset_format` (text, messages, prompt-completion)."""
        if self.document_attention != "auto":
            return self.document_attention
        return "cross" if dataset_format == "text" else "isolated"
