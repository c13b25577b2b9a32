"""Rollouts: a `teacher-cache generate` output read as the very tokens its generator read and drew, for a build
whose teacher has the generator's tokenizer (on-policy distillation: the student writes, the teacher scores each of
its tokens).

A row's document is its prompt as the generator tokenized it (`prompt_token_ids`), then its reply as drawn
(`response_token_ids`); nothing is rendered or tokenized again. Re-tokenizing the reply's text would not do: a
sampled reply may split a word in a way the tokenizer never would (a non-canonical tokenization), and the teacher
must score the tokens the student drew, not others with the same text. Each token of the reply carries the
log-prob it had under the distribution it was drawn from: the generator's `sampling_logprobs`, or its own
`response_logprobs` when it sampled at temperature 1 without top-k or top-p (the same distribution); the store
keeps them as `behaviour_logprob` (`storage.targets.rollout`). A reply that does not end with EOS (cut at
--max-new-tokens, or by a stop string) gets one appended, neither trained nor drawn, to separate packed documents.

Which tokens are trained: the reply's, the tokens the generator drew (`--train-on` assistant, last-assistant or
completion: earlier assistant turns of a prompt were not drawn by it), or every token (`--train-on all`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import datasets
import numpy as np

from storage.conversations import ROWS_PER_BLOCK, ChatCounts
from storage.identity import tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT = "rollouts"  # the manifest's dataset.format of a store built this way
# A rollout: token ids, trained flag and behaviour log-prob (NaN: not drawn) of each token.
Rollout = tuple[list[int], list[bool], list[float]]


def behaviour_column(dataset: datasets.Dataset, manifest: dict) -> str | None:
    """The column holding each reply token's log-prob under the distribution it was drawn from, or None when the
    generator could not give it for every row (vLLM beyond top-k 128, or with top-p)."""
    if dataset.data.column("sampling_logprobs").null_count == 0:
        return "sampling_logprobs"
    sampling = manifest["sampling"]
    plain = sampling["temperature"] == 1.0 and sampling["top_k"] == 0 and sampling["top_p"] == 1.0
    return "response_logprobs" if plain else None


def rollout_encoder(dataset: datasets.Dataset, manifest: dict, tokenizer, *, train_on: str,
                    overlong: str) -> RolloutEncoder | None:
    """The encoder that reads a generated dataset's rows as rollouts, or None (saying why) when they cannot be: the
    generator's tokenizer is not `tokenizer`, or the output predates stored prompt tokens. The build then renders
    and tokenizes the conversations' text like any other."""
    if tokenizer_fingerprint(tokenizer) != manifest["generator"]["tokenizer_sha256"]:
        log.warning("%s wrote these replies with another tokenizer than the teacher's: their text is tokenized again "
                    "(no behaviour log-probs are kept, so the store is no on-policy rollout store)",
                    manifest["generator"]["model"])
        return None
    if "prompt_token_ids" not in dataset.column_names:
        log.warning("this generated dataset holds no prompt token ids (written by an older teacher-cache): its "
                    "conversations are tokenized again; generate it anew to score the exact tokens drawn")
        return None
    column = behaviour_column(dataset, manifest)
    if column is None:
        log.warning("the generator gave no log-probs of its sampling distribution (%s): the store keeps the tokens "
                    "drawn but no behaviour log-probs, which the rollout_rkl loss needs", manifest["sampling"])
    return RolloutEncoder(tokenizer, manifest, behaviour=column, train_on=train_on, overlong=overlong)


class RolloutEncoder:
    """Turns the rows of a generated dataset into rollouts (module docstring), with the interface of
    `storage.conversations.ChatEncoder` that `storage.samples.iter_rows` reads.

    Attributes:
        behaviour: the column of the behaviour log-probs, or None when there are none (documents then carry no
            third element and the samples no `behaviour_logprob`).
        counts: the rows encoded, truncated and dropped so far (none are skipped: every row has a reply).
    """

    def __init__(self, tokenizer, manifest: dict, *, behaviour: str | None, train_on: str, overlong: str):
        if tokenizer.eos_token_id is None:
            raise ValueError("the teacher's tokenizer has no EOS token, which packing needs between documents.")
        self.eos = tokenizer.eos_token_id
        self.manifest, self.behaviour = manifest, behaviour
        self.train_on, self.overlong = train_on, overlong
        self.counts = ChatCounts()

    @property
    def drawn(self) -> bool:
        """Whether the documents carry behaviour log-probs."""
        return self.behaviour is not None

    def manifest_entry(self) -> dict:
        """The choices to record in the manifest's `dataset` section."""
        return {"format": FORMAT, "train_on": self.train_on, "overlong": self.overlong,
                "chat_template_sha256": self.manifest["chat_template_sha256"],
                "behaviour": self.behaviour}

    def iter_documents(self, dataset: datasets.Dataset, seq_len: int) -> Iterator[list[Rollout]]:
        """The rollouts of the rows, a block at a time, in row order."""
        columns = ["prompt_token_ids", "response_token_ids", *([self.behaviour] if self.behaviour else [])]
        for batch in dataset.select_columns(columns).iter(batch_size=ROWS_PER_BLOCK):
            behaviours = batch[self.behaviour] if self.behaviour else [None] * len(batch["prompt_token_ids"])
            documents = (self.document(prompt, reply, drawn, seq_len) for prompt, reply, drawn in
                         zip(batch["prompt_token_ids"], batch["response_token_ids"], behaviours, strict=True))
            yield [doc for doc in documents if doc is not None]
        c = self.counts
        log.info("rollouts: %d encoded, %d truncated and %d dropped (longer than %d tokens)", c.encoded, c.truncated,
                 c.dropped, seq_len + 1)

    def document(self, prompt: list[int], reply: list[int], drawn: list[float] | None,
                 seq_len: int) -> Rollout | None:
        """One row's rollout (its behaviour log-probs only when the encoder has them), or None when it is dropped
        (longer than seq_len + 1 tokens with --overlong drop)."""
        ids = prompt + reply
        trained = [self.train_on == "all"] * len(prompt) + [True] * len(reply)
        behaviour = [np.nan] * len(prompt) + (drawn if drawn is not None else [np.nan] * len(reply))
        if ids[-1] != self.eos:
            ids, trained, behaviour = ids + [self.eos], trained + [False], behaviour + [np.nan]
        if len(ids) > seq_len + 1:
            if self.overlong == "drop":
                self.counts.dropped += 1
                return None
            ids, trained, behaviour = ids[: seq_len + 1], trained[: seq_len + 1], behaviour[: seq_len + 1]
            self.counts.truncated += 1
        self.counts.encoded += 1
        return (ids, trained, behaviour) if self.drawn else (ids, trained)
