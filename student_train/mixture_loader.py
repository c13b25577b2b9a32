"""Training on a main store mixed with other stores at fixed shares (`student-train --mix STORE=WEIGHT`).

Sits beside `student_train.loader` in the flow: each store keeps its own `StoreLoader` (its own order, seed and
epochs), and `MixedLoader` hands the trainer whole micro-batches of one store each, so stores of different target
kinds never share a batch. Which store gives micro-batch k is a pure function of k and the shares (`MixSchedule`,
a smooth weighted round-robin over the exact shares), never of timing, so every rank agrees and the share of each
store is exact over any window up to about one batch. The main store (`--store`) gets the share left by the mixed
ones; an epoch is one pass over it: ceil(its batches / its share) micro-batches. The mixed stores are trained on
whole (no held-out part).

On-policy distillation (GKD) mixes the student's own samples, scored by the teacher, with off-policy data: with the
rollouts as `--store`, the on-policy share (GKD's lambda) is 1 - the sum of the mixed weights.

The loader's state is the schedule's position (micro-batches handed out, and how many from each store) and each
store loader's own state, so a resumed run reads what an uninterrupted one would have read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from storage.integrity import StoreDamaged
from storage.manifest import Manifest, isolates_documents
from storage.reader import Store
from student_train.collate import Batch
from student_train.config import TrainConfig, parse_mix
from student_train.loader import LoaderConfig, StoreLoader
from student_train.targets import check_targets, check_top_k

if TYPE_CHECKING:
    from student_train.loss_config import LossConfig

STATE_VERSION = 1
MAIN = "main"  # the name of --store among a mix's sources
SOURCE = "mix_source"  # the record of a mixed batch that names its store: its index in the mix, an int64 scalar


class MixSchedule:
    """Which source gives each micro-batch: smooth weighted round-robin over exact shares.

    Micro-batch k goes to the source of the largest deficit (k + 1) * share - taken so far (the first on ties), so
    after any k micro-batches each source has given round(k * share) of them, within about one.

    Args:
        shares: one per source, positive, summing to 1.
    """

    def __init__(self, shares: list[Fraction]):
        assert sum(shares) == 1 and all(share > 0 for share in shares), shares
        self.total = math.lcm(*(share.denominator for share in shares))
        self.weights = [int(share * self.total) for share in shares]  # share * total, exact integers
        self.position, self.counts = 0, [0] * len(shares)

    def next(self) -> int:
        """The source of micro-batch `position`; advances the schedule."""
        deficits = [(self.position + 1) * weight - count * self.total
                    for weight, count in zip(self.weights, self.counts, strict=True)]
        source = max(range(len(deficits)), key=deficits.__getitem__)
        self.position += 1
        self.counts[source] += 1
        return source


@dataclass(frozen=True, kw_only=True)
class MixSource:
    """One store of a mix.

    Attributes:
        index: its place in the mix (0: --store).
        name: how metrics name it: MAIN for --store, else the store's directory name (its path when that is taken).
        store: the store's path or URL.
        share: the share of micro-batches drawn from it.
        isolated: whether its packed documents attend only within themselves (`isolates_documents`).
    """

    index: int
    name: str
    store: str
    share: Fraction
    isolated: bool


class MixedLoader:
    """What the trainer iterates with --mix: micro-batches forever, each from one store's loader as `MixSchedule`
    says, with the record SOURCE naming that store (`source_of`).

    Args:
        sources: the stores, --store first.
        loaders: a loader per source, in the same order.
    """

    def __init__(self, sources: list[MixSource], loaders: list[StoreLoader]):
        self.sources, self.loaders = sources, loaders
        self.schedule = MixSchedule([source.share for source in sources])

    def __len__(self) -> int:
        """Micro-batches per epoch: one pass over the main store at its share."""
        return math.ceil(len(self.loaders[0]) / self.sources[0].share)

    def describe(self) -> str:
        """The mix as the run's log names it: "main 0.5 + answers 0.5"."""
        return " + ".join(f"{source.name} {float(source.share):g}" for source in self.sources)

    def __iter__(self) -> Iterator[Batch]:
        streams = [_forever(loader) for loader in self.loaders]
        while True:
            index = self.schedule.next()
            yield next(streams[index]) | {SOURCE: torch.tensor(index)}

    def source_of(self, batch: Batch) -> MixSource:
        """The store a batch of this loader came from."""
        return self.sources[int(batch[SOURCE])]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "micro_batches": self.schedule.position, "counts": list(self.schedule.counts),
                "world_size": self.loaders[0].world_size, "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last micro-batch counted in `state` (a state of the same mix)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"mixed loader state version {state.get('version')!r}; this loader reads "
                             f"{STATE_VERSION}.")
        self.schedule.position, self.schedule.counts = state["micro_batches"], list(state["counts"])
        for loader, loader_state in zip(self.loaders, state["loaders"], strict=True):
            loader.load_state_dict(loader_state)


def _forever(loader: StoreLoader) -> Iterator[Batch]:
    """A loader's batches, epoch after epoch, from its current position."""
    while True:
        yield from loader


def mixed_loader(config: TrainConfig, main: StoreLoader, manifest: Manifest, mixed: dict[str, Manifest], *,
                 rank: int, world_size: int) -> MixedLoader:
    """The loader of `config.mix`: `main` (the loader of --store, of the store `manifest`) and a loader of each
    mixed store (`mixed`: their manifests by store, from `open_mixed_stores`), read whole with the run's seed."""
    mix = parse_mix(config.mix)
    stores = [config.store, *(store for store, _ in mix)]
    shares = [1 - sum(share for _, share in mix), *(share for _, share in mix)]
    manifests = [manifest, *(mixed[store] for store in stores[1:])]
    sources = [MixSource(index=index, name=name, store=store, share=share, isolated=isolates_documents(m.build))
               for index, (name, store, share, m) in enumerate(zip(source_names(stores), stores, shares, manifests,
                                                                        strict=True))]
    loaders = [main] + [StoreLoader(LoaderConfig(store=store, batch_size=config.batch_size, seed=config.seed,
                                                 num_workers=config.num_workers, verify=config.verify),
                                    rank=rank, world_size=world_size) for store in stores[1:]]
    return MixedLoader(sources, loaders)


def source_names(stores: list[str]) -> list[str]:
    """MAIN for the first store, then each store's directory name, or its path where that name is taken."""
    names = [MAIN] + [Path(store.rstrip("/")).name for store in stores[1:]]
    return [name if index == 0 or names.count(name) == 1 else stores[index] for index, name in enumerate(names)]


# --- checks -------------------------------------------------------------------------------------------------------


def open_mixed_stores(config: TrainConfig, manifest: Manifest, loss_config: LossConfig) -> dict[str, Manifest]:
    """The manifests of the mixed stores by store, each checked against the main store's (`manifest`) and the loss.

    Raises:
        ValueError: a mixed store that does not exist or is incomplete, holds another tokenizer's ids, another
            vocabulary or sample length, or lacks what the loss reads; the message names the store and the fix.
    """
    manifests = {}
    for store, _ in parse_mix(config.mix):
        try:
            mixed = Store(store, verify=False).manifest
        except StoreDamaged:
            raise
        except RuntimeError as exc:  # no store there, or an unfinished one
            raise ValueError(f"--mix {store}: {exc}") from None
        _check_compatible(store, mixed, config.store, manifest)
        try:
            if loss_config.divergence_weights:
                check_targets(loss_config.targets, mixed.targets)
            check_top_k(config.top_k, mixed.targets)
        except ValueError as exc:
            raise ValueError(f"--mix {store}: {exc} Every store of a mix trains with the same loss, over "
                             f"{loss_config.targets} targets.") from None
        if config.feature_loss and mixed.targets.get("hidden_states") != manifest.targets.get("hidden_states"):
            raise ValueError(f"--mix {store}: --feature-loss reads the teacher hidden states that {config.store} "
                             "holds, and this store holds others or none; build it with the main store's "
                             "`teacher-cache build --hidden-layers`, or leave --feature-loss out.")
        manifests[store] = mixed
    return manifests


def _check_compatible(store: str, mixed: Manifest, main_store: str, main: Manifest) -> None:
    """A mixed store holds ids of the main store's tokenizer and vocabulary, in samples of its length.

    Raises:
        ValueError: naming what differs and how to rebuild the store.
    """
    fix = (f"Rebuild {store} with a teacher of the main store's tokenizer and its --seq-len "
           f"{main.build['seq_len']}, or leave it out of --mix.")
    if mixed.teacher["tokenizer_sha256"] != main.teacher["tokenizer_sha256"]:
        raise ValueError(f"--mix {store}: built with {mixed.teacher['model']}'s tokenizer (sha256 "
                         f"{mixed.teacher['tokenizer_sha256'][:12]}), the main store {main_store} with "
                         f"{main.teacher['model']}'s (sha256 {main.teacher['tokenizer_sha256'][:12]}); the stores "
                         f"of a mix must hold ids of one tokenizer. {fix}")
    if mixed.teacher["vocab_size"] != main.teacher["vocab_size"]:
        raise ValueError(f"--mix {store}: its targets use a vocabulary of {mixed.teacher['vocab_size']} ids, the main "
                         f"store {main_store}'s of {main.teacher['vocab_size']}. {fix}")
    if mixed.build["seq_len"] != main.build["seq_len"]:
        raise ValueError(f"--mix {store}: its samples are {mixed.build['seq_len']} tokens long, the main store "
                         f"{main_store}'s {main.build['seq_len']}. {fix}")


# --- metrics ------------------------------------------------------------------------------------------------------


class SourceWindow:
    """Per source of a mix, over the steps since the last metrics record: the samples trained on and their mean loss.

    Args:
        names: the sources' names, in the mix's order.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self.sums_S3 = torch.zeros(len(names), 3, dtype=torch.float64)  # samples, trained tokens, loss x tokens

    def add(self, sums_S3: torch.Tensor) -> None:
        """Add one step's sums (of every rank), [sources, 3] as `sums_S3`."""
        self.sums_S3 += sums_S3

    def record(self) -> dict:
        """{"samples_from": {name: samples}, "loss_from": {name: token-weighted mean loss, or None without
        tokens}} of the window, which starts again."""
        samples, tokens, loss = self.sums_S3.T.tolist()
        self.sums_S3.zero_()
        return {"samples_from": {name: int(n) for name, n in zip(self.names, samples, strict=True)},
                "loss_from": {name: total / n if n else None
                              for name, total, n in zip(self.names, loss, tokens, strict=True)}}
