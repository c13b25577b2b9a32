"""Ensembling stores of different teachers over the same samples into one store of their weighted mixture:
`teacher-cache merge A B ... --output C --ensemble [--weights 0.7,0.3]`.

The members must share the tokenizer and vocabulary (`teacher.tokenizer_sha256`, `tokenizer_vocab_size`,
`vocab_size`) and hold the same samples: equal seq_len and sample count, and equal `input_ids` and `loss_mask`
in every sample (checked before anything is written; the first differing sample is named). Their teachers,
target parameters and shard sizes may differ. The output's records are the mixture's (`storage/mixture.py`):

- top-k + tail, when every member has it: the k largest mixed probabilities over the union of the members' top-k
  ids (k = the largest member k unless chosen smaller), the rest of the union and the members' weighted tails in
  the tail;
- `true_logprob` exact; `entropy` a lower bound (`targets.entropy.exact` false);
- sampled draws, when every member has them drawn from its full distribution and the weights split the draws
  into integers (`draw_split`): pooled, subsampled with `seed` when the weights or draw counts differ. Draws from
  a top-k plus a tail bucket (vllm) cannot be pooled (each bucket means "outside that member's top-k"), nor can
  draws from the tail outside a member's top-k (hybrid targets), so such ensembles keep no sampled targets (their
  top-k is kept);
- hidden states are dropped (each member's are of another model).

A kind that cannot be kept is dropped with a warning. Records are computed a block of samples at a time and
written through `StoreWriter`, shard for shard as the first member's shards, committing to `merging.json` until
the whole store is written (so `resume` continues an interrupted ensemble, and a resumed one equals an
uninterrupted one: the subsample draws of shard s are seeded by (seed, s)).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from storage.concat import open_inputs
from storage.fs import Location
from storage.lock import OutputLock
from storage.manifest import Manifest, header_differences
from storage.mixture import TopkUnion, entropy_lower_bound, mix_logprobs, pool_draws
from storage.reader import Store
from storage.targets import KINDS, sampled, topk
from storage.writer import StoreWriter, concat_records

log = logging.getLogger(__name__)

# Teacher keys the members must share: they decide what a token id means.
TOKENIZER_KEYS = ("tokenizer_sha256", "tokenizer_vocab_size", "vocab_size")
SAMPLE_ARRAYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")
# Pooled entries (top-k ids or draws of all members) per block of samples: bounds the memory of the mixing.
BLOCK_ENTRIES = 1 << 21


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """Options of an ensemble.

    Attributes:
        inputs: the member stores (at least 2): same tokenizer and vocabulary, the same samples.
        output: the new store's location (absent or empty).
        weights: each member's weight, positive, normalised to sum 1; None: equal weights.
        top_k: top-k ids kept per position, at most the largest member k (their default).
        seed: seed of the draws subsampled when the weights or the members' draw counts differ.
        resume: finish an interrupted ensemble of the same members and options into `output`.
    """

    inputs: tuple[str, ...]
    output: str
    weights: tuple[float, ...] | None = None
    top_k: int | None = None
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if len(self.inputs) < 2:
            raise ValueError(f"--ensemble needs at least 2 stores, got {len(self.inputs)}.")
        if self.weights is not None:
            if len(self.weights) != len(self.inputs):
                raise ValueError(f"--weights: {len(self.weights)} weights for {len(self.inputs)} stores; give one "
                                 "per store, in the order of the stores.")
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise ValueError(f"--weights: expected positive weights, got {list(self.weights)}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k: expected a positive number of ids, got {self.top_k}.")

    @property
    def normalised_weights(self) -> list[float]:
        weights = self.weights or (1.0,) * len(self.inputs)
        return [w / sum(weights) for w in weights]


@dataclass(frozen=True)
class _Plan:
    """What the ensemble holds: weights, top-k ids kept (None: no top-k) and draws taken per member (None: none)."""

    weights: list[float]
    top_k: int | None
    draws: list[int] | None


def ensemble_stores(config: EnsembleConfig) -> Manifest:
    """Write the weighted mixture of the member stores' targets to a new store; returns its manifest.

    Raises:
        ValueError: a member is unfinished or not a store; the members differ in tokenizer, vocabulary or
            samples (named); nothing can be ensembled; `top_k` is too large; the output exists.
        LockError: another writer holds the output's lock (`storage/lock.py`).
    """
    with OutputLock(Location(config.output)):
        StoreWriter.check_merged_output(Location(config.output), resume=config.resume)
        stores = open_inputs(config.inputs)
        check_same_samples(stores)
        plan = _plan(stores, config)
        writer = StoreWriter.open_merged(config.output, ensemble_manifest(stores, plan, config), resume=config.resume)
        done = writer.committed_shards
        first = stores[0]
        starts = np.cumsum([0] + [len(shard) for shard in first.shards])
        with tqdm(total=first.manifest.num_positions, unit="tok", unit_scale=True,
                  desc="teacher-cache merge --ensemble", dynamic_ncols=True) as bar:
            for index, shard in enumerate(first.shards):
                if index not in done:
                    rng = np.random.default_rng([config.seed, index])
                    writer.write_shard(index, _mix_rows(stores, plan, int(starts[index]), int(starts[index + 1]),
                                                        rng))
                bar.update(shard.info.num_positions)
        manifest = writer.finish()
    log.info("ensembled %d stores into %s: %d samples, %d trained tokens in %d shards", len(stores), config.output,
             manifest.num_samples, manifest.num_tokens, len(manifest.shards))
    return manifest


def check_same_samples(stores: Sequence[Store]) -> None:
    """Refuse members that do not read the same token ids in the same samples.

    Raises:
        ValueError: another tokenizer or vocabulary, seq_len or sample count (each difference named), or the
            first sample whose `input_ids` or `loss_mask` differ.
    """
    first = stores[0]
    problems = []
    for store in stores[1:]:
        problems += header_differences(_sample_key(first), _sample_key(store), old_name=str(first.location),
                                       new_name=str(store.location))
    if problems:
        raise ValueError("Cannot ensemble stores of other tokenizers or other samples:\n  " + "\n  ".join(problems)
                         + "\nAn ensemble needs stores of teachers with one tokenizer over the same samples.")
    for start, stop in _blocks(first, 1):
        want = first.read_rows(start, stop, ["input_ids", "loss_mask"])
        for store in stores[1:]:
            got = store.read_rows(start, stop, ["input_ids", "loss_mask"])
            for name in ("input_ids", "loss_mask"):
                differ = np.flatnonzero((got[name] != want[name]).reshape(stop - start, -1).any(1))
                if differ.size:
                    raise ValueError(
                        f"Cannot ensemble {store.location} with {first.location}: sample {start + differ[0]} has "
                        f"other {name}. An ensemble needs the same samples in every store: build each from the same "
                        "dataset with the same --seq-len, --pack and --max-samples."
                    )


def _sample_key(store: Store) -> dict:
    manifest = store.manifest
    return {"teacher": {key: manifest.teacher.get(key) for key in TOKENIZER_KEYS},
            "build": {"seq_len": manifest.build["seq_len"],
                      "document_attention": manifest.build.get("document_attention")}, "samples": len(store)}


def _plan(stores: Sequence[Store], config: EnsembleConfig) -> _Plan:
    """Which kinds the ensemble keeps: each kind's rule (`TargetKind.ensemble`) warns of what it drops."""
    names = [str(store.location) for store in stores]
    targets = [store.manifest.targets for store in stores]
    weights = config.normalised_weights
    kept = {name: kind.ensemble(names, targets, weights=weights, top_k=config.top_k) for name, kind in KINDS.items()}
    if kept["topk"] is None and kept["sampled"] is None:
        raise ValueError("Nothing to ensemble: the stores share neither top-k targets nor sampled draws that can be "
                         "pooled (see the warnings above).")
    return _Plan(weights, kept["topk"], kept["sampled"])


def ensemble_manifest(stores: Sequence[Store], plan: _Plan, config: EnsembleConfig) -> Manifest:
    """The (empty, unfinished) manifest of the ensemble: its teacher is the weighted list of members."""
    first = stores[0].manifest
    members = [{**store.manifest.teacher, "weight": weight, "store": str(store.location),
                "targets": store.manifest.targets} for store, weight in zip(stores, plan.weights, strict=True)]
    dtypes = {m["dtype"] for m in members}
    teacher = {
        "model": "ensemble of " + ", ".join(m["model"] for m in members),
        "backend": "ensemble",
        "architecture": "ensemble",
        "config_sha256": _sha256([[m["config_sha256"], m["weight"]] for m in members]),
        "weights_sha256": _sha256([[m["weights_sha256"], m["weight"]] for m in members]),
        **{key: first.teacher[key] for key in (*TOKENIZER_KEYS, "eos_token_id", "pad_token_id")},
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "num_hidden_layers": None,
        "hidden_size": None,
        "members": members,
    }
    shared = " + I(member; id) over the ids in every member's top-k" if plan.top_k is not None else ""
    targets: dict = {"entropy": {"exact": False, "bound": "lower", "formula": f"sum_j w_j H_j{shared}"},
                     "true_logprob": {}}
    if plan.top_k is not None:
        targets["topk"] = topk.section(
            plan.top_k, source="ensemble: weighted sum over the union of the members' top-k ids, tails combined")
    if plan.draws is not None:
        targets["sampled"] = sampled.section(sum(plan.draws), config.seed, source="pooled member draws",
                                             member_draws=plan.draws)
    return Manifest(teacher=teacher, dataset=dict(first.dataset), build={**first.build, "seed": config.seed},
                    targets=targets, created_by=first.created_by)


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _blocks(store: Store, entries_per_position: int, start: int = 0, stop: int | None = None):
    """Row ranges [a, b) of [start, stop) holding about BLOCK_ENTRIES pooled entries each."""
    stop = len(store) if stop is None else stop
    rows = max(1, BLOCK_ENTRIES // (store.manifest.build["seq_len"] * max(entries_per_position, 1)))
    return [(a, min(a + rows, stop)) for a in range(start, stop, rows)]


def _mix_rows(stores: Sequence[Store], plan: _Plan, start: int, stop: int, rng: np.random.Generator) -> dict:
    """The ensemble's record of the samples [start, stop), mixed a block of samples at a time."""
    topk = sum(s.manifest.targets["topk"]["k"] for s in stores) if plan.top_k is not None else 0
    draws = sum(s.manifest.targets["sampled"]["num_draws"] for s in stores) if plan.draws is not None else 0
    entries = max(topk, draws)
    return concat_records([_mix_block(stores, plan, a, b, rng) for a, b in _blocks(stores[0], entries, start, stop)])


def _mix_block(stores: Sequence[Store], plan: _Plan, start: int, stop: int, rng: np.random.Generator) -> dict:
    names = ["entropy", "true_logprob"]
    names += list(topk.ARRAYS) if plan.top_k is not None else []
    names += ["sampled_ids", "sampled_counts"] if plan.draws is not None else []
    record = stores[0].read_rows(start, stop, SAMPLE_ARRAYS)
    members = [store.read_rows(start, stop, names) for store in stores]
    B, L = record["loss_mask"].shape
    trained_P = np.flatnonzero(record["loss_mask"])  # only these positions hold targets (zero elsewhere)

    def trained(name: str) -> list[np.ndarray]:
        return [m[name].reshape(B * L, *m[name].shape[2:])[trained_P] for m in members]

    def dense(values_P: np.ndarray) -> np.ndarray:
        out = np.zeros((B * L, *values_P.shape[1:]), values_P.dtype)
        out[trained_P] = values_P
        return out.reshape(B, L, *values_P.shape[1:])

    weights = plan.weights
    record["true_logprob"] = dense(mix_logprobs(trained("true_logprob"), weights))
    shared_information = None
    if plan.top_k is not None:
        union = TopkUnion(trained("topk_ids"), trained("topk_logprobs"), trained("tail_logmass"), weights)
        ids_PK, logprobs_PK, tail_P = union.top(plan.top_k)
        record |= {"topk_ids": dense(ids_PK), "topk_logprobs": dense(logprobs_PK), "tail_logmass": dense(tail_P)}
        shared_information = union.shared_information()
    record["entropy"] = dense(entropy_lower_bound(trained("entropy"), weights, shared_information))
    if plan.draws is not None:
        num_draws = [store.manifest.targets["sampled"]["num_draws"] for store in stores]
        nunique_P, ids_E, counts_E = pool_draws([(m["sampled_ids"], m["sampled_counts"]) for m in members],
                                                num_draws, plan.draws, rng)
        record |= {"sampled_nunique": dense(nunique_P), "sampled_ids": ids_E, "sampled_counts": counts_E}
    return record
