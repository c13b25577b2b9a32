"""The rows of the quality benchmark (`benchmarks/quality.py`): what each row trains on, the stores they read, the
targets they are held to, and the stored bytes per token of each row's records.

A row is a `RowSpec` (the TrainConfig options that select its targets) on the store of a `StoreSpec`; `quality.py`
builds the stores and trains the rows, `quality_report.py` aggregates and prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.reader import Store
from storage.targets.sampled import MULTINOMIAL, SYSTEMATIC

CE_ROW, FULL_ROW = "ce", "online"  # the two ends of the gap
# Share of the CE -> online gap a row must close (issue targets: sampled >= 95%, top-64 + tail >= 90%, hybrid >= 97%).
GAP_TARGETS = {"sampled_n50": 0.95, "topk_tail_k64": 0.90, "hybrid_k64_n50": 0.97,
               "sampled_n50_systematic": 0.95, "hybrid_k64_n50_systematic": 0.97}
CACHED_TIME_TARGET = 1.1  # wall time of a cached-KD run relative to CE's
BYTES_TARGET = (50.0, 0.95)  # some cached row at <= 50 stored bytes per token closes >= 95% of the gap


@dataclass(frozen=True)
class StoreSpec:
    """The records a store holds (BuildConfig fields); the held-out store of a spec is built the same way."""

    targets: tuple[str, ...] = ("topk", "sampled")
    top_k: int = 64
    num_draws: int = 50
    draw_scheme: str = MULTINOMIAL


@dataclass(frozen=True)
class RowSpec:
    """One row: a student trained with these TrainConfig options on top of the shared ones.

    Attributes:
        name: key in the report and the run's directory name.
        label: the table's description.
        options: TrainConfig fields of this row (targets_from, top_k, loss, ...).
        kd: the loss is forward_kl=ALPHA, ce=1-ALPHA (else CE alone, unless `options` gives a loss).
        online: the teacher runs online (`online_teacher`).
        store: key of STORES: the records the row trains on.
    """

    name: str
    label: str
    options: dict = field(default_factory=dict)
    kd: bool = True
    online: bool = False
    store: str = "main"


STORES = {
    "main": StoreSpec(),
    # Hybrid targets (exact top-k head + N draws from the tail), one store per (k, N): the draws depend on k.
    "hybrid_k8_n16": StoreSpec(targets=("hybrid",), top_k=8, num_draws=16),
    "hybrid_k16_n32": StoreSpec(targets=("hybrid",), top_k=16, num_draws=32),
    "hybrid_k64_n50": StoreSpec(targets=("hybrid",), top_k=64, num_draws=50),
    "hybrid_k64_n200": StoreSpec(targets=("hybrid",), top_k=64, num_draws=200),
    # Systematic draws (`--draw-scheme systematic`): the same N, each id drawn floor(N p) or ceil(N p) times.
    "sampled_systematic": StoreSpec(targets=("sampled",), draw_scheme=SYSTEMATIC),
    "hybrid_k8_n16_systematic": StoreSpec(targets=("hybrid",), top_k=8, num_draws=16, draw_scheme=SYSTEMATIC),
    "hybrid_k64_n50_systematic": StoreSpec(targets=("hybrid",), top_k=64, num_draws=50, draw_scheme=SYSTEMATIC),
}
ROWS = (
    RowSpec(CE_ROW, "CE only", kd=False),
    RowSpec("topk_renorm_k8", "top-8 renormalised", {"targets_from": "topk_renorm", "top_k": 8}),
    RowSpec("topk_renorm_k64", "top-64 renormalised", {"targets_from": "topk_renorm", "top_k": 64}),
    RowSpec("topk_tail_k64", "top-64 + tail", {"targets_from": "topk_tail", "top_k": 64}),
    RowSpec("sampled_n50", "sampled, N = 50", {"targets_from": "sampled"}),
    RowSpec("sampled_n50_systematic", "sampled, N = 50, systematic", {"targets_from": "sampled"},
            store="sampled_systematic"),
    RowSpec("topk_residual_k64", "top-64, tail mass to the true token",
            {"targets_from": "topk_residual", "top_k": 64}),
    RowSpec("hybrid_k8_n16", "hybrid, top-8 + 16 tail draws", {"targets_from": "hybrid"}, store="hybrid_k8_n16"),
    RowSpec("hybrid_k8_n16_systematic", "hybrid, top-8 + 16 systematic tail draws", {"targets_from": "hybrid"},
            store="hybrid_k8_n16_systematic"),
    RowSpec("hybrid_k16_n32", "hybrid, top-16 + 32 tail draws", {"targets_from": "hybrid"}, store="hybrid_k16_n32"),
    RowSpec("hybrid_k64_n50", "hybrid, top-64 + 50 tail draws", {"targets_from": "hybrid"}, store="hybrid_k64_n50"),
    RowSpec("hybrid_k64_n50_systematic", "hybrid, top-64 + 50 systematic tail draws", {"targets_from": "hybrid"},
            store="hybrid_k64_n50_systematic"),
    # 4x the draws of the row above: how much of what hybrid misses is the variance of the tail estimate.
    RowSpec("hybrid_k64_n200", "hybrid, top-64 + 200 tail draws", {"targets_from": "hybrid"},
            store="hybrid_k64_n200"),
    RowSpec(FULL_ROW, "online full KD", online=True),
)
BY_NAME = {row.name: row for row in ROWS}
# The rows of a real teacher (`--student-init`, e.g. SmolLM2-135M-Instruct): the kinds the targets name.
REAL_TEACHER_ROWS = ("topk_tail_k64", "sampled_n50", "sampled_n50_systematic", "hybrid_k64_n50",
                     "hybrid_k64_n50_systematic")
# The stored arrays each representation reads, for its bytes per token (`target_bytes`).
TOPK_RECORD = ("topk_ids", "topk_logprobs", "tail_logmass")
SAMPLED_RECORD = ("sampled_nunique", "sampled_offsets", "sampled_ids", "sampled_counts")
RECORDS = {"topk_tail": TOPK_RECORD, "topk_renorm": TOPK_RECORD[:2], "topk_residual": TOPK_RECORD,
           "sampled": SAMPLED_RECORD, "hybrid": TOPK_RECORD + SAMPLED_RECORD}


def systematic(name: str) -> bool:
    """Whether row `name` trains on systematic draws (its store's spec says so)."""
    return STORES[BY_NAME[name].store].draw_scheme == SYSTEMATIC


def target_bytes(row: RowSpec, store: Store) -> float | None:
    """Stored bytes per trained token of the records a row trains on (None for CE and online KD).

    A row that keeps only the `top_k` most probable of the stored ids is charged what a store of that k holds:
    its top-k record re-encoded by the store's own writer from the first shards (`storage.writer.write_arrays`).
    """
    representation = row.options.get("targets_from")
    if representation is None:
        return None
    top_k, stored_k = row.options.get("top_k"), store.manifest.targets.get("topk", {}).get("k")
    if top_k is None or top_k >= stored_k:
        per_array = store.bytes_per_token()
        return sum(per_array.get(name, 0.0) for name in RECORDS[representation])
    return _subset_topk_bytes(store, top_k, RECORDS[representation])


def _subset_topk_bytes(store: Store, k: int, names: tuple[str, ...], max_shards: int = 4) -> float:
    """Bytes per trained token of the top-k record narrowed to its `k` most probable ids (the dropped mass joins
    the tail), as the writer encodes it, measured on the first `max_shards` shards."""
    import numpy as np
    import zarr
    from zarr.storage import MemoryStore

    from storage.targets import array_specs
    from storage.targets.topk import logical_sizes
    from storage.writer import quantized_record, write_arrays

    total, tokens = 0, 0
    for shard in store.shards[:max_shards]:
        record = shard.read()
        logp = record["topk_logprobs"].astype(np.float64)
        kept = np.sort(np.argsort(-logp, axis=-1, kind="stable")[..., :k], axis=-1)  # ids stay ascending
        dropped = logp.copy()
        np.put_along_axis(dropped, kept, -np.inf, axis=-1)
        tail = np.logaddexp(record["tail_logmass"].astype(np.float64), np.logaddexp.reduce(dropped, axis=-1))
        narrowed = {"topk_ids": np.take_along_axis(record["topk_ids"], kept, -1),
                    "topk_logprobs": np.take_along_axis(logp, kept, -1).astype(np.float32),
                    "tail_logmass": tail.astype(np.float32)}
        specs = array_specs(vocab_size=store.manifest.teacher["vocab_size"], targets={"topk": {"k": k}})
        specs = {name: spec for name, spec in specs.items() if name.startswith("topk_") or name in names}
        group = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
        stored = logical_sizes(write_arrays(group, specs, quantized_record(narrowed, specs)))
        total += sum(size for name, size in stored.items() if name in names)
        tokens += int(record["loss_mask"].sum())
    return total / max(tokens, 1)
