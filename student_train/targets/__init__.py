"""The student side of the target kinds: which representation a store trains and evaluates with, and whether it
holds what a chosen representation reads.

One module per kind of `storage.targets` that a representation reads (`topk`, `sampled`, `hybrid`); hidden states
are read by the feature loss (`student_train.features`), not by a representation.
"""

from __future__ import annotations

from student_train.targets.base import StudentKind
from student_train.targets.hybrid import HYBRID
from student_train.targets.sampled import SAMPLED
from student_train.targets.topk import TOPK

# In order of preference for a store's default representation: a hybrid store holds top-k targets too.
STUDENT_KINDS: dict[str, StudentKind] = {kind.name: kind for kind in (HYBRID, TOPK, SAMPLED)}
# In order of preference for the held-out KL: the exact K + 1-bucket KL where the store has top-k targets (hybrid
# stores too: the number a top-k store of the same k gives, without the noise and the upward bias of a plug-in
# tail), else the draws.
EVAL_KINDS = (TOPK, SAMPLED)


def default_targets(targets: dict) -> str:
    """The representation of a store's divergences: hybrid when its draws are of the tail, else topk_tail when it
    has top-k targets, else sampled."""
    return next((kind.default for kind in STUDENT_KINDS.values() if kind.present(targets)), SAMPLED.default)


def eval_targets(targets: dict, *, cross: bool = False) -> str:
    """The representation of the held-out KL: topk_tail when the store has top-k targets, else sampled; across
    tokenizers, mapped top-k targets, else the chunks' likelihoods."""
    if cross:
        return "mapped" if TOPK.present(targets) else "chunks"
    return next((kind.default for kind in EVAL_KINDS if kind.present(targets)), SAMPLED.default)


def check_targets(representation: str, targets: dict) -> None:
    """The store must hold what `representation` reads (nothing to check for one that reads no stored kind, such
    as online).

    Raises:
        ValueError: it does not; the message names the store to build or the representation to use instead.
    """
    for kind in STUDENT_KINDS.values():
        if representation in kind.representations:
            kind.check(representation, targets)
    if representation in TOPK.cross_representations:
        TOPK.check(representation, targets)


def check_top_k(top_k: int | None, targets: dict) -> None:
    """--top-k must name at most as many ids as the store's top-k record holds (see `TopK.check_top_k`)."""
    TOPK.check_top_k(top_k, targets)
