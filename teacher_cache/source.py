"""What a build reads before its teacher loads: the dataset, its format (text or conversations), the chat template
and whether packed documents are read alone; and how the conversations become documents and are reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from storage.conversations import ChatConfig, ChatCounts, ChatEncoder
from storage.samples import load_samples_dataset
from teacher_cache.config import BuildConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """The build's dataset as read, before the teacher loads: its rows, their format (text, messages,
    prompt-completion), the chat template's text (None: the tokenizer's) and whether packed documents are isolated."""

    dataset: datasets.Dataset
    format: str
    chat_template: str | None
    isolated: bool


def read_source(config: BuildConfig) -> Source:
    """The build's dataset and what decides how it becomes samples.

    Raises:
        ValueError: a dataset `load_samples_dataset` refuses, a chat template for text or a missing template file,
            isolated documents with the vllm backend.
    """
    dataset, fmt = load_samples_dataset(config.dataset, split=config.split, text_field=config.text_field,
                                        dataset_format=config.dataset_format)
    if config.chat_template is not None and fmt == "text":
        raise ValueError(f"--chat-template {config.chat_template}: {config.dataset} is read as text, which has no "
                         "turns to render; pass --format messages or prompt-completion for conversations, or leave "
                         "--chat-template out.")
    template = None
    if config.chat_template is not None:
        path = Path(config.chat_template).expanduser()
        if not path.is_file():
            raise ValueError(f"--chat-template {config.chat_template}: no such file; give a Jinja chat template file.")
        template = path.read_text()
    return Source(dataset, fmt, template, config.isolates(fmt))


def chat_encoder(config: BuildConfig, source: Source, tokenizer) -> ChatEncoder | None:
    """How the conversations of `source` become documents (None for text)."""
    if source.format == "text":
        return None
    chat = ChatConfig(train_on=config.train_on, chat_template=source.chat_template, overlong=config.overlong,
                      strict=config.strict)
    return ChatEncoder(tokenizer, chat, source.format)


def report_conversations(counts: ChatCounts, config: BuildConfig) -> None:
    """Warn of the conversations that gave no sample, or only part of one (the encoder logs every count)."""
    if counts.skipped:
        log.warning("skipped %d conversations with nothing to train on under --train-on %s (--strict refuses them)",
                    counts.skipped, config.train_on)
    if counts.truncated or counts.dropped:
        log.warning("%d conversations longer than --seq-len %d + 1 tokens were %s", counts.truncated + counts.dropped,
                    config.seq_len, "truncated" if counts.truncated else "dropped (--overlong drop)")
