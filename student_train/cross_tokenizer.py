"""Cross-tokenizer batches: a store batch in the teacher's token ids, re-expressed in the student's.

Sits between the loader's collation (`student_train.collate`, the store's records in teacher ids) and the loss
(`student_train.cross_losses`, the `chunks`, `mapped` and `sorted` targets): a `CrossTokenizer` is the loader's
batch transform when the student's tokenizer is not the store's. Per sample, `storage.alignment` recovers the text of
the teacher's ids, tokenizes it with the student's tokenizer (each document and turn apart) and cuts it into chunks
where both tokenizations start and end at the same characters; from those:

- the student's sample: its text tokens, with each teacher special token (BOS, EOS, turn markers) as the student's
  token of the same string, or its BOS or EOS by role (`storage.alignment.special_map`);
- `loss_mask`: a student token is trained when every teacher token of its chunk was (`carry_mask`); a special token
  as its teacher token; never the sample's first token, which nothing predicts;
- `segment_ids`: each student token takes the document of a teacher token of its chunk;
- `chunk_ids` and `chunk_logprob` (for `chunks`): the teacher's log-likelihood of each chunk, the sum of its stored
  true-token log-probs, for the chunks whose every token, on both sides, is trained; each special token is a chunk
  of its own (so that the student learns where documents and turns end);
- `topk_ids`, `topk_logprobs`, `tail_logmass` and `kd_mask` (for `mapped` and `sorted`, when the store has top-k
  targets): at each aligned boundary (a student position whose next token starts a chunk), the teacher's top-k at
  the teacher position whose next token starts the same chunk, each id as the student id of the same bytes
  (`storage.alignment.vocabulary_map`; -1 for none, two teacher ids of one student id merged into the first).
  Also where the next token is special (its teacher top-k at the teacher's special token). Not where the next
  token is the first text token after a special token: a sentencepiece student writes a prefix space there that
  the teacher's token does not have;
- `chars`: the characters of the token each position predicts, for bits per character.

Legend: B samples, N teacher tokens of a sample (L + 1 with padding), M student tokens of a sample, C chunks, K
top-k entries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoTokenizer

from storage.alignment import (
    Chunks,
    TokenSpans,
    align,
    carry_mask,
    special_map,
    student_tokens,
    teacher_text,
    vocabulary_map,
)
from storage.identity import tokenizer_fingerprint
from storage.manifest import Manifest
from student_train.collate import Batch
from student_train.divergences import CROSS_TARGETS
from student_train.student import compatibility_problems
from student_train.targets.topk import TOPK

if TYPE_CHECKING:
    from student_train.config import TrainConfig

log = logging.getLogger(__name__)

TOPK_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass")
# The options whose work needs the store's own token ids, and the reason given when they meet another tokenizer.
SAME_IDS_ONLY = {
    "online_teacher": "the online teacher reads the student's token ids",
    "feature_loss": "the stored hidden states sit at the teacher's token positions",
    "mix": "the mixed stores are read without the alignment",
    "top_k": "--top-k narrows same-tokenizer top-k targets",
}


def default_cross_targets(targets: dict) -> str:
    """The representation of a cross-tokenizer run unless --targets-from says otherwise: mapped top-k when the store
    has top-k targets (it beat CE and the other two in bits per character, benchmarks/RESULTS.md section 10), else
    chunks (approximate likelihood matching), which every store supports."""
    return "mapped" if TOPK.present(targets) else "chunks"


def cross_tokenizer_for(config: TrainConfig, manifest: Manifest, tokenizer) -> CrossTokenizer | None:
    """The batch transform of a run whose student reads `tokenizer`: a `CrossTokenizer` when it is not the store's
    tokenizer, or when --targets-from names a cross-tokenizer target; None otherwise (the store's ids as they are).

    Raises:
        ValueError: tokenizers that cannot be aligned (the mismatch, why, and the fix); a teacher tokenizer that is
            missing or not the store's; a same-tokenizer representation or option with another tokenizer.
    """
    same = tokenizer_fingerprint(tokenizer) == manifest.teacher["tokenizer_sha256"]
    if same and config.targets_from not in CROSS_TARGETS:
        return None
    student = config.student_tokenizer or config.student
    if not same:
        if config.targets_from is not None and config.targets_from not in CROSS_TARGETS:
            raise ValueError(f"--targets-from {config.targets_from}: compares distributions over the teacher's token "
                             f"ids, and the student {student} reads another tokenizer; choose one of "
                             f"{', '.join(CROSS_TARGETS)} (or leave --targets-from out), or a student with the "
                             "teacher's tokenizer.")
        for name, reason in SAME_IDS_ONLY.items():
            if getattr(config, name):
                raise ValueError(f"--{name.replace('_', '-')}: the student {student} reads another tokenizer than the "
                                 f"store's, and {reason}; leave --{name.replace('_', '-')} out, or use a student "
                                 "with the teacher's tokenizer.")
    teacher = teacher_tokenizer(config.teacher_tokenizer, manifest)
    try:
        cross = CrossTokenizer(teacher, tokenizer, manifest.teacher["vocab_size"])
    except ValueError as error:
        mismatch = compatibility_problems(tokenizer, manifest.teacher["vocab_size"], manifest, student)
        raise ValueError(f"{' '.join(mismatch)} Training through the character alignment is not possible either: "
                         f"{error}") from None
    log.info("student tokenizer %s (%d tokens) %s the store's (%s): training through the character alignment of the "
             "two tokenizations; %.0f%% of the teacher's ids have a student token of the same bytes",
             student, len(tokenizer), "is" if same else "is not", manifest.teacher["model"], 100 * cross.mapped_share)
    return cross


def teacher_tokenizer(given: str | None, manifest: Manifest):
    """The store's teacher tokenizer: the directory `given` (--teacher-tokenizer), else the manifest's teacher
    directory; its fingerprint must be the manifest's.

    Raises:
        ValueError: no such directory, or another tokenizer than the store's.
    """
    source = given or manifest.teacher.get("model")
    path = Path(source).expanduser() if source else None
    if path is None or not path.is_dir():
        raise ValueError(f"the student reads another tokenizer than the store's, and the store's teacher tokenizer "
                         f"is not at {source}: pass --teacher-tokenizer DIR, a local copy of the tokenizer the store "
                         "was built with.")
    teacher = AutoTokenizer.from_pretrained(path)
    found, stored = tokenizer_fingerprint(teacher), manifest.teacher["tokenizer_sha256"]
    if found != stored:
        raise ValueError(f"the teacher tokenizer at {path} is not the one the store was built with (sha256 "
                         f"{found[:12]}, the store's {stored[:12]}); pass --teacher-tokenizer DIR with the store's "
                         "tokenizer.")
    return teacher


@dataclass(frozen=True)
class Row:
    """One sample in the student's tokens (M of them; the positions are M - 1)."""

    input_ids: np.ndarray  # [M] int64
    segment_ids: np.ndarray  # [M] int64
    loss_mask: np.ndarray  # [M - 1] bool
    chars: np.ndarray  # [M - 1] int64: characters of the token each position predicts
    chunk_ids: np.ndarray  # [M - 1] int64: chunk of the predicted token if that chunk is used, else -1
    chunk_logprob: np.ndarray  # [C] float32: the teacher's log-likelihood of each chunk, NaN where not used
    aligned: np.ndarray  # [M - 1] int64: the teacher position whose targets this position gets, -1 for none


@dataclass
class CrossTokenizer:
    """Turns collated store batches (teacher ids) into batches in the student's ids (module docstring).

    Args:
        teacher: the store's teacher tokenizer (its fingerprint is the manifest's).
        student: the student's tokenizer.
        vocab_size: the teacher's vocabulary (the store's ids are below it).
    """

    teacher: object
    student: object
    vocab_size: int
    vocab_map: np.ndarray = field(init=False, repr=False)  # [vocab_size] teacher id -> student id, -1 for none
    _special: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vocab_map = vocabulary_map(self.teacher, self.student, self.vocab_size)
        self._special = special_map(self.teacher, self.student)

    @property
    def mapped_share(self) -> float:
        """The share of the teacher tokenizer's ids with a student token of the same bytes."""
        return float((self.vocab_map[:len(self.teacher)] >= 0).mean())

    def row(self, ids_N: np.ndarray, trained_N: np.ndarray, segment_N: np.ndarray,
            true_logprob_N: np.ndarray) -> Row:
        """One sample in the student's tokens.

        Args:
            ids_N: the teacher's token ids, padding removed.
            trained_N: whether each token is a trained target (token i: the store's `loss_mask[i - 1]`; token 0
                false).
            segment_N: the document of each token.
            true_logprob_N: the teacher's log-prob of each token (token 0: any value, unused).
        """
        teacher = teacher_text(self.teacher, ids_N)
        student, origin_M = self._student(teacher)
        chunks = align(teacher, student)
        special_M = student.special
        in_chunk_M = chunks.student_chunk >= 0
        origin_M[in_chunk_M] = chunks.teacher[chunks.student_chunk[in_chunk_M], 0]
        trained_M = carry_mask(trained_N, chunks)
        trained_M[special_M] = trained_N[origin_M[special_M]]
        trained_M[0] = False
        # The text's chunks, then each special token as a chunk of its own: one teacher and one student token.
        specials = np.flatnonzero(special_M)
        member_N = chunks.teacher_chunk >= 0
        loglik_C = np.concatenate([
            np.bincount(chunks.teacher_chunk[member_N], np.where(trained_N, true_logprob_N, 0.0)[member_N],
                        minlength=len(chunks)),
            np.where(trained_M[specials], true_logprob_N[origin_M[specials]], 0.0)])
        used_C = np.concatenate([_used_chunks(chunks, trained_N, trained_M), trained_M[specials]])
        chunk_M = np.where(in_chunk_M, chunks.student_chunk, -1)
        chunk_M[specials] = len(chunks) + np.arange(len(specials))
        chunk_M = np.where((chunk_M >= 0) & used_C[chunk_M.clip(0)], chunk_M, -1)
        aligned_M = _aligned_positions(chunks, trained_N, trained_M, special_M)
        at_special = specials[trained_M[specials]]  # a trained special token: its teacher token is trained too
        aligned_M[at_special] = origin_M[at_special] - 1
        spans = student.spans
        return Row(input_ids=student.ids, segment_ids=segment_N[origin_M].astype(np.int64),
                   loss_mask=trained_M[1:], chars=(spans[1:, 1] - spans[1:, 0]), chunk_ids=chunk_M[1:],
                   chunk_logprob=np.where(used_C, loglik_C, np.nan).astype(np.float32), aligned=aligned_M[1:])

    def _student(self, teacher: TokenSpans) -> tuple[TokenSpans, np.ndarray]:
        """The student's tokens of the teacher's text, special tokens included, and for each a teacher token it
        comes from: its own for a special token, else -1 (to be filled from its chunk) or the last token."""
        text = student_tokens(self.student, teacher.text, breaks=teacher.breaks)
        special_S = np.flatnonzero(teacher.special)
        missing = [int(i) for i in teacher.ids[special_S] if int(i) not in self._special]
        if missing:
            name = self.teacher.convert_ids_to_tokens(missing[0])
            raise ValueError(f"the teacher's special token {name!r} (id {missing[0]}) has no counterpart in the "
                             f"student's tokenizer {self.student.name_or_path!r}: add it to the student's tokenizer "
                             "(tokenizer.add_special_tokens, then resize the student's embeddings) so that the "
                             "student reads the same documents and turns.")
        offsets = np.concatenate([teacher.spans[special_S, 0], text.spans[:, 0]])
        kind = np.concatenate([np.zeros(len(special_S), np.int64), np.ones(len(text.ids), np.int64)])
        order = np.lexsort((np.arange(len(offsets)), kind, offsets))  # by offset; specials first, in their order
        ids = np.concatenate([[self._special[int(i)] for i in teacher.ids[special_S]], text.ids]).astype(np.int64)
        spans = np.concatenate([np.repeat(teacher.spans[special_S, :1], 2, axis=1), text.spans])
        breakable = np.concatenate([np.ones(len(special_S), bool), text.breakable[:-1]])
        origin = np.concatenate([special_S, np.full(len(text.ids), len(teacher.ids) - 1)])
        tokens = TokenSpans(text=teacher.text, ids=ids[order], spans=spans[order],
                            breakable=np.append(breakable[order], True), special=(kind == 0)[order])
        return tokens, origin[order]

    def __call__(self, batch: Batch) -> Batch:
        """The batch in the student's ids, with the records the cross-tokenizer losses read."""
        real_BN = batch["attention_mask"].numpy()
        ids_BN, segment_BN = batch["input_ids"].numpy(), batch["segment_ids"].numpy()
        trained_BN = np.pad(batch["loss_mask"].numpy(), ((0, 0), (1, 0)))
        true_BN = np.pad(batch["true_logprob"].numpy(), ((0, 0), (1, 0)))
        rows = []
        for b in range(len(ids_BN)):
            n = int(real_BN[b].sum())
            rows.append(self.row(ids_BN[b, :n], trained_BN[b, :n], segment_BN[b, :n], true_BN[b, :n]))
        out = _pad_rows(rows)
        out["sample_ids"] = batch["sample_ids"]
        if all(key in batch for key in TOPK_KEYS):
            out |= self._mapped_targets(rows, {key: batch[key].numpy() for key in TOPK_KEYS})
        return out

    def _mapped_targets(self, rows: list[Row], topk: dict[str, np.ndarray]) -> Batch:
        """topk_ids (student ids, -1 for none), topk_logprobs, tail_logmass and kd_mask at the student positions."""
        width, k = max(len(row.aligned) for row in rows), topk["topk_ids"].shape[-1]
        ids_BMK = np.full((len(rows), width, k), -1, np.int64)
        logp_BMK = np.full((len(rows), width, k), -math.inf, np.float32)
        tail_BM = np.zeros((len(rows), width), np.float32)
        for b, row in enumerate(rows):
            at = np.flatnonzero(row.aligned >= 0)
            source = row.aligned[at]
            ids_BMK[b, at], logp_BMK[b, at] = _merge_duplicates(self.vocab_map[topk["topk_ids"][b, source]],
                                                                topk["topk_logprobs"][b, source])
            tail_BM[b, at] = topk["tail_logmass"][b, source]
        aligned_BM = np.stack([np.pad(row.aligned >= 0, (0, width - len(row.aligned))) for row in rows])
        return {"topk_ids": torch.from_numpy(ids_BMK), "topk_logprobs": torch.from_numpy(logp_BMK),
                "tail_logmass": torch.from_numpy(tail_BM), "kd_mask": torch.from_numpy(aligned_BM)}


def _used_chunks(chunks: Chunks, trained_N: np.ndarray, trained_M: np.ndarray) -> np.ndarray:
    """[C] bool: chunks whose every teacher and student token is trained."""
    untrained_C = np.bincount(chunks.teacher_chunk[(chunks.teacher_chunk >= 0) & ~trained_N], minlength=len(chunks))
    untrained_C += np.bincount(chunks.student_chunk[(chunks.student_chunk >= 0) & ~trained_M], minlength=len(chunks))
    return untrained_C == 0


def _aligned_positions(chunks: Chunks, trained_N: np.ndarray, trained_M: np.ndarray,
                       special_M: np.ndarray) -> np.ndarray:
    """[M] for each student token m that starts a chunk of the text, both first tokens trained and token m - 1 not
    special: the teacher position (i - 1, predicting the chunk's first teacher token i) whose top-k the student
    position m - 1 gets; -1 elsewhere."""
    aligned_M = np.full(len(trained_M), -1, np.int64)
    first_student, first_teacher = chunks.student[:, 0], chunks.teacher[:, 0]
    keep = trained_M[first_student] & trained_N[first_teacher] & (first_student >= 1) & (first_teacher >= 1)
    keep &= ~special_M[(first_student - 1).clip(0)]
    aligned_M[first_student[keep]] = first_teacher[keep] - 1
    return aligned_M


def _merge_duplicates(ids_PK: np.ndarray, logp_PK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of one position that map to the same student id become one: the first keeps the summed probability,
    the others get id -1 and probability 0."""
    ids_PK, logp_PK = ids_PK.copy(), logp_PK.astype(np.float32, copy=True)
    order_PK = np.argsort(ids_PK, axis=-1, kind="stable")
    sorted_PK = np.take_along_axis(ids_PK, order_PK, -1)
    repeat_PK = np.zeros_like(sorted_PK, bool)
    repeat_PK[:, 1:] = (sorted_PK[:, 1:] == sorted_PK[:, :-1]) & (sorted_PK[:, 1:] >= 0)
    for p, j in zip(*np.nonzero(repeat_PK), strict=True):
        run_start = j
        while repeat_PK[p, run_start]:
            run_start -= 1
        first, duplicate = order_PK[p, run_start], order_PK[p, j]
        logp_PK[p, first] = np.logaddexp(logp_PK[p, first], logp_PK[p, duplicate])
        ids_PK[p, duplicate], logp_PK[p, duplicate] = -1, -math.inf
    return ids_PK, logp_PK


def _pad_rows(rows: list[Row]) -> Batch:
    """The rows as a batch, padded at the end to the longest (padding: id 0, untrained, the last document)."""
    width, chunks = max(len(row.input_ids) for row in rows), max(len(row.chunk_logprob) for row in rows)

    def stack(values: list[np.ndarray], size: int, fill) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.pad(v, (0, size - len(v)), constant_values=fill) for v in values]))

    return {
        "input_ids": stack([row.input_ids for row in rows], width, 0),
        "attention_mask": stack([np.ones(len(row.input_ids), bool) for row in rows], width, False),
        "segment_ids": torch.from_numpy(np.stack([np.pad(row.segment_ids, (0, width - len(row.segment_ids)),
                                                         mode="edge") for row in rows])),
        "loss_mask": stack([row.loss_mask for row in rows], width - 1, False),
        "chars": stack([row.chars for row in rows], width - 1, 0),
        "chunk_ids": stack([row.chunk_ids for row in rows], width - 1, -1),
        "chunk_logprob": stack([row.chunk_logprob for row in rows], chunks, np.nan),
    }
