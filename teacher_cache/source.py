"""What a build reads before its teacher loads: the dataset, its format (text or conversations), the chat template
and whether packed documents are read alone; and how what became of the conversations is reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from storage.conversations import ChatCounts
from storage.fs import Location
from storage.generated import is_generated, load_manifest
from storage.integrity import DIGEST_KEY
from storage.samples import load_samples_dataset
from teacher_cache.config import BuildConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """The build's dataset as read, before the teacher loads: its rows, their format (text, messages,
    prompt-completion), the chat template's text (None: the tokenizer's), whether packed documents are isolated, and
    for a `teacher-cache generate` output, what wrote its replies (`generated_by`)."""

    dataset: datasets.Dataset
    format: str
    chat_template: str | None
    isolated: bool
    generated_by: dict | None = None
    generation: dict | None = None
    """For a `teacher-cache generate` output, its checked manifest (generation.json)."""


def read_source(config: BuildConfig) -> Source:
    """The build's dataset and what decides how it becomes samples.

    Raises:
        ValueError: a dataset `load_samples_dataset` refuses, a chat template for text or a missing template file,
            isolated documents with the vllm backend.
    """
    dataset, fmt = load_samples_dataset(config.dataset, split=config.split, fields=config.columns,
                                        dataset_format=config.dataset_format)
    template = config.template_text(fmt, config.dataset)
    path = Path(config.dataset).expanduser()
    generation = load_manifest(Location(path)) if path.is_dir() and is_generated(path) else None
    by = None if generation is None else generated_by(generation)
    return Source(dataset, fmt, template, config.isolates(fmt), by, generation)


def generated_by(manifest: dict) -> dict:
    """For a `teacher-cache generate` output (its manifest), the model that wrote its replies, how it sampled them,
    the template it read the prompts with and the output's digest."""
    return {"model": manifest["generator"]["model"], "weights_sha256": manifest["generator"]["weights_sha256"],
            "backend": manifest["generator"]["backend"], "sampling": manifest["sampling"],
            "chat_template_sha256": manifest["chat_template_sha256"], "filters": manifest["filters"],
            "manifest_sha256": manifest[DIGEST_KEY]}


def report_conversations(counts: ChatCounts, config: BuildConfig) -> None:
    """Warn of the conversations that gave no sample, or only part of one (the encoder logs every count)."""
    if counts.skipped:
        log.warning("skipped %d conversations with nothing to train on under --train-on %s (--strict refuses them)",
                    counts.skipped, config.train_on)
    if counts.truncated or counts.dropped:
        log.warning("%d conversations longer than --seq-len %d + 1 tokens were %s", counts.truncated + counts.dropped,
                    config.seq_len, "truncated" if counts.truncated else "dropped (--overlong drop)")
