"""Quality of the target kinds: one student trained on the same batches and token budget with CE only, with each kind
of cached target, and with online full-logit KD, then evaluated on held-out text.

Flow: build (or reuse) a training store and a held-out store from the teacher (`teacher_cache.build_cache`: top-64
+ tail and N = 50 draws in one store) -> for each row, `student_train.train` into OUTPUT/runs/ROW (same student
config, seed, batch size, steps and samples; a finished run is reused, an interrupted one resumed from its last
checkpoint) -> every student and the teacher scored on the whole held-out store by the evaluation code of
`student-train eval` (`student_train.evaluate.score`: LM loss, KL(teacher || student) exact over the vocabulary,
top-1 agreement, ECE of the top-1 prediction) -> OUTPUT/quality.{md,json,png}.

Rows (`ROWS`; KD rows train on forward_kl=ALPHA, ce=1-ALPHA):
  ce               CE only (the lower reference)
  topk_renorm_k8   the 8 most probable of the stored 64 ids, renormalised (`--top-k 8`, as a top-8 store would give)
  topk_renorm_k64  the 64 stored ids, renormalised
  topk_tail_k64    the 64 stored ids + the tail bucket
  sampled_n50      the N = 50 draws (RS-KD)
  topk_residual_k64  the 64 stored ids, the tail mass given to the true next token (a baseline from the literature)
  hybrid_kK_nN     the exact top-K head + N draws from the tail outside it (`--targets hybrid`), one store per (K, N):
                   (8, 16), (16, 32), (64, 50), and (64, 200) to show what the tail estimate's variance costs
  *_systematic     sampled_n50, hybrid_k8_n16 and hybrid_k64_n50 with systematic draws (`--draw-scheme
                   systematic`, lower variance at the same N), each on its own store
  online           the teacher's full distribution, computed during training (`--online-teacher`, the upper one)
A row is a `RowSpec` (the TrainConfig options that select its targets) on the store of a `StoreSpec`.

Each row reports its held-out LM loss, ECE, KL to the teacher, top-1 agreement, and the share of the CE -> online
gap it closes, (loss_ce - loss_row) / (loss_ce - loss_online) (undefined when online is not better than CE), the
stored bytes per token of the records it trains on (`target_bytes`); its wall time (the whole `train` call:
loading, steps and the periodic held-out evaluations, which every row shares) and median training tokens/s, each
relative to CE's. Targets checked: sampled >= 95% of the gap, top-64 + tail >= 90%, hybrid (top-64 + 50) >= 97%
(either draw scheme), every cached kind's ECE <= CE's, cached KD's run time <= 1.1x CE's. quality_bytes.png plots
each cached row's gap share against its bytes per token (triangles: systematic draws); quality.png shows each run's
held-out LM loss (its metrics.jsonl `eval` records, every --eval-every steps) and training CE by step.

    python benchmarks/quality.py --teacher .demo/teacher --train-data .demo/teacher/corpus/train.jsonl \\
        --heldout-data .demo/teacher/corpus/heldout.jsonl --student-config .demo/student-config \\
        --steps 200 --batch-size 8 --seq-len 256 --output runs/quality

Run it again with the same options to reuse every finished store, run and evaluation (and to finish the rest).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.causal_lm import resolve_device  # noqa: E402
from storage.fs import Location  # noqa: E402
from storage.manifest import Manifest  # noqa: E402
from storage.reader import Store  # noqa: E402
from storage.targets.sampled import MULTINOMIAL, SYSTEMATIC, draw_scheme, draws_from_tail  # noqa: E402
from student_train.checkpoint import latest_checkpoint  # noqa: E402
from student_train.config import TrainConfig  # noqa: E402
from student_train.eval_report import write_atomic  # noqa: E402
from student_train.evaluate import read_rows, score  # noqa: E402
from student_train.train import train  # noqa: E402
from teacher_cache.build import build_cache  # noqa: E402
from teacher_cache.config import BuildConfig  # noqa: E402
from teacher_cache.teacher import TransformersTeacher  # noqa: E402

REPORT_VERSION = 1
RUN_RECORD = "quality_run.json"  # written when a row's training finished: its options, wall time
EVAL_RECORD = "quality_eval.json"  # the row's held-out metrics
CE_ROW, FULL_ROW = "ce", "online"  # the two ends of the gap
# Share of the CE -> online gap a row must close (issue targets: sampled >= 95%, top-64 + tail >= 90%, hybrid >= 97%).
GAP_TARGETS = {"sampled_n50": 0.95, "topk_tail_k64": 0.90, "hybrid_k64_n50": 0.97,
               "sampled_n50_systematic": 0.95, "hybrid_k64_n50_systematic": 0.97}
CACHED_TIME_TARGET = 1.1  # wall time of a cached-KD run relative to CE's


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
# The stored arrays each representation reads, for its bytes per token (`target_bytes`).
TOPK_RECORD = ("topk_ids", "topk_logprobs", "tail_logmass")
SAMPLED_RECORD = ("sampled_nunique", "sampled_offsets", "sampled_ids", "sampled_counts")
RECORDS = {"topk_tail": TOPK_RECORD, "topk_renorm": TOPK_RECORD[:2], "topk_residual": TOPK_RECORD,
           "sampled": SAMPLED_RECORD, "hybrid": TOPK_RECORD + SAMPLED_RECORD}


@dataclass(kw_only=True)
class QualitySetup:
    """What every row shares; see `main` for each option."""

    teacher: str
    train_data: str
    heldout_data: str
    student_config: str
    output: str
    steps: int
    batch_size: int
    seq_len: int
    alpha: float = 0.9
    lr: float = 1e-3
    seed: int = 0
    train_samples: int | None = None
    heldout_samples: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    device: str = "auto"
    chunk_positions: int = 256
    build_batch_size: int = 8
    text_field: str = "text"
    rows: tuple[str, ...] = tuple(row.name for row in ROWS)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "chunk_positions", "build_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}.")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"--alpha: the KD weight must be in (0, 1], got {self.alpha}.")
        known = [row.name for row in ROWS]
        unknown = [name for name in self.rows if name not in known]
        if unknown:
            raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(known)}.")
        self.rows = tuple(name for name in known if name in {*self.rows, CE_ROW, FULL_ROW})  # the gap's ends always
        self.teacher = str(Path(self.teacher).expanduser().resolve())
        self.train_samples = self.train_samples or self.steps * self.batch_size  # one epoch, no sample twice
        self.eval_every = self.eval_every or max(1, self.steps // 10)
        self.save_every = self.save_every or max(1, self.steps // 4)


def log(message: str) -> None:
    click.echo(f"[quality {time.strftime('%H:%M:%S')}] {message}", err=True)


def ensure_store(path: Path, spec: StoreSpec, setup: QualitySetup, dataset: str, samples: int | None) -> Store:
    """The store at `path`, built unless a complete one with these options is there (an interrupted one resumes).

    Raises:
        ValueError: a complete store there was built with other options.
    """
    wanted = {"model": setup.teacher, "seq_len": setup.seq_len, "max_samples": samples, "targets": spec}
    if (path / "manifest.json").exists():
        manifest = Manifest.load(Location(path))
        found = {"model": manifest.teacher["model"], "seq_len": manifest.build["seq_len"],
                 "max_samples": manifest.build["max_samples"],
                 "targets": StoreSpec(targets=_target_kinds(manifest.targets),
                                      top_k=manifest.targets.get("topk", {}).get("k", spec.top_k),
                                      num_draws=manifest.targets.get("sampled", {}).get("num_draws", spec.num_draws),
                                      draw_scheme=draw_scheme(manifest.targets.get("sampled", {})))}
        if manifest.complete and found == wanted:
            log(f"store {path}: reused ({manifest.num_samples} samples)")
            return Store(path)
        if manifest.complete:
            differ = ", ".join(f"{k} {found[k]} (wanted {wanted[k]})" for k in wanted if found[k] != wanted[k])
            raise ValueError(f"{path} holds a store built with other options: {differ}; choose another --output.")
    log(f"store {path}: building from {dataset} ({samples or 'all'} samples of {setup.seq_len} positions)")
    build_cache(BuildConfig(model=setup.teacher, dataset=dataset, output=str(path), text_field=setup.text_field,
                            max_samples=samples, seq_len=setup.seq_len, targets=spec.targets, top_k=spec.top_k,
                            num_draws=spec.num_draws, draw_scheme=spec.draw_scheme,
                            batch_size=setup.build_batch_size, device=setup.device,
                            resume=path.exists()))
    return Store(path)


def _target_kinds(targets: dict) -> tuple[str, ...]:
    """The build's --targets of a store, from its manifest's targets section."""
    if draws_from_tail(targets):
        return ("hybrid",)
    return tuple(kind for kind in ("topk", "sampled") if kind in targets)


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


def train_options(row: RowSpec, setup: QualitySetup, stores: dict[str, Path], heldout: Path, output: Path) -> dict:
    """The TrainConfig options of a row: the shared ones, then the row's."""
    options = dict(store=str(stores[row.store]), student=setup.student_config, output=str(output),
                   batch_size=setup.batch_size, max_steps=setup.steps, lr=setup.lr, seed=setup.seed,
                   eval_store=str(heldout), eval_every=setup.eval_every, save_every=setup.save_every,
                   log_every=1, keep_checkpoints=1, device=setup.device, chunk_positions=setup.chunk_positions,
                   alpha=setup.alpha if row.kd else 0.0)
    if row.online:
        options["online_teacher"] = setup.teacher
    return options | row.options


def run_row(row: RowSpec, options: dict) -> dict:
    """Train a row into options["output"], or reuse the finished run there; returns its RUN_RECORD.

    Raises:
        ValueError: the directory holds a finished run with other options.
    """
    output = Path(options["output"])
    record_path = output / RUN_RECORD
    comparable = json.loads(json.dumps(options))
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["options"] != comparable:
            changed = sorted(k for k in {*record["options"], *comparable}
                             if record["options"].get(k) != comparable.get(k))
            raise ValueError(f"{output} holds a finished run with other options ({', '.join(changed)}); choose "
                             "another --output, or delete that run.")
        log(f"{row.name}: reused the finished run ({record['wall_s']:.1f} s)")
        return record
    resume = latest_checkpoint(output) is not None
    if output.exists() and not resume:  # an attempt stopped before its first checkpoint: start it again
        shutil.rmtree(output)
    log(f"{row.name}: {'resuming' if resume else 'training'} ({row.label}, {options['max_steps']} steps)")
    load_before, began = os.getloadavg()[0], time.perf_counter()
    train(TrainConfig(**options, resume=resume))
    record = {"options": comparable, "wall_s": time.perf_counter() - began, "resumed": resume,
              "load_average_1min": [load_before, os.getloadavg()[0]]}
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    (output / EVAL_RECORD).unlink(missing_ok=True)
    log(f"{row.name}: trained in {record['wall_s']:.1f} s")
    return record


def evaluate_rows(setup: QualitySetup, heldout: Store, run_dirs: dict[str, Path]) -> tuple[dict, dict[str, dict]]:
    """(the teacher's held-out metrics, each row's), both models scored by `student_train.evaluate.score`."""
    device = resolve_device(setup.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    rows = read_rows(heldout, 0, len(heldout))
    teacher_cache_path = Path(setup.output) / "teacher_eval.json"
    results, teacher_metrics, teacher = {}, None, None
    if teacher_cache_path.exists():
        teacher_metrics = json.loads(teacher_cache_path.read_text())
    for name, run_dir in run_dirs.items():
        cached = run_dir / EVAL_RECORD
        if cached.exists():
            results[name] = json.loads(cached.read_text())
            continue
        log(f"{name}: scoring the student and the teacher on {len(rows)} held-out rows")
        teacher = teacher or TransformersTeacher(setup.teacher, device=str(device), dtype=dtype)
        student = TransformersTeacher(str(run_dir), device=str(device), dtype=dtype)
        metrics = score(teacher, student, rows, batch_size=setup.batch_size,
                        chunk_positions=setup.chunk_positions).result()
        results[name] = _without_diagram(metrics["student"])
        teacher_metrics = _without_diagram(metrics["teacher"])
        write_atomic(cached, json.dumps(results[name], indent=1).encode())
        write_atomic(teacher_cache_path, json.dumps(teacher_metrics, indent=1).encode())
    return teacher_metrics, results


def _without_diagram(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "reliability"}


def curves(run_dir: Path) -> dict[str, list]:
    """From a run's metrics.jsonl: held-out LM loss by step (eval records) and training CE by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"heldout": [[r["eval"]["step"], r["eval"]["lm_loss"]] for r in records if "eval" in r],
            "train_ce": [[r["step"], r["ce"]] for r in records if "eval" not in r],
            "tokens_per_s": [r["tokens_per_s"] for r in records if "eval" not in r]}


def summarise(setup: QualitySetup, runs: dict[str, dict], metrics: dict[str, dict], run_dirs: dict[str, Path],
              row_bytes: dict[str, float | None]):
    """The report's rows: metrics, gap share, times, curves, bytes per token of the targets."""
    gap = metrics[CE_ROW]["lm_loss"] - metrics[FULL_ROW]["lm_loss"]
    ce_time = runs[CE_ROW]["wall_s"]
    out = []
    for row in (r for r in ROWS if r.name in setup.rows):
        m, curve = metrics[row.name], curves(run_dirs[row.name])
        tokens_per_s = statistics.median(curve.pop("tokens_per_s"))
        out.append({
            "name": row.name, "label": row.label, "options": runs[row.name]["options"],
            **{key: m[key] for key in ("lm_loss", "perplexity", "ece", "kl_to_teacher", "top1_agreement", "tokens")},
            "gap_share": (metrics[CE_ROW]["lm_loss"] - m["lm_loss"]) / gap if gap > 0 else None,
            "wall_s": runs[row.name]["wall_s"], "resumed": runs[row.name]["resumed"],
            "load_average_1min": runs[row.name]["load_average_1min"],
            "wall_vs_ce": runs[row.name]["wall_s"] / ce_time, "train_tokens_per_s": tokens_per_s,
            "curves": curve, "target_bytes_per_token": row_bytes.get(row.name),
        })
    ce_speed = next(row["train_tokens_per_s"] for row in out if row["name"] == CE_ROW)
    for row in out:
        row["tokens_per_s_vs_ce"] = row["train_tokens_per_s"] / ce_speed
    return out, gap


def verdicts(rows: list[dict], gap: float) -> list[dict]:
    by_name = {row["name"]: row for row in rows}
    out = []
    for name, share in GAP_TARGETS.items():
        if name in by_name:
            value = by_name[name]["gap_share"]
            out.append({"target": f"{by_name[name]['label']} closes >= {share:.0%} of the CE -> online gap",
                        "value": value, "met": value is not None and value >= share})
    cached = [row for row in rows if row["name"] not in (CE_ROW, FULL_ROW)]
    if cached and CE_ROW in by_name:
        worst = max(cached, key=lambda row: row["ece"])
        out.append({"target": f"every cached kind's ECE <= CE's {by_name[CE_ROW]['ece']:.4f} (worst: {worst['label']})",
                    "value": worst["ece"], "met": worst["ece"] <= by_name[CE_ROW]["ece"]})
    if cached:
        slowest = max(cached, key=lambda row: row["wall_vs_ce"])
        out.append({"target": f"cached-KD run time <= {CACHED_TIME_TARGET}x CE's (slowest: {slowest['label']})",
                    "value": slowest["wall_vs_ce"], "met": slowest["wall_vs_ce"] <= CACHED_TIME_TARGET})
    if gap <= 0:
        out.append({"target": "online KD beats CE on held-out LM loss (else no gap to share)", "value": gap,
                    "met": False})
    return out


def machine(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"host": platform.node(), "cpu": names[0] if names else platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run_quality(setup: QualitySetup) -> dict:
    """Build the stores, train and evaluate every row (reusing what is done), write the report; returns it."""
    load_before = os.getloadavg()
    began = time.perf_counter()
    output = Path(setup.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = [row for row in ROWS if row.name in setup.rows]
    store_dirs = {row.store: output / "stores" / row.store for row in rows}
    stores = {name: ensure_store(path, STORES[name], setup, setup.train_data, setup.train_samples)
              for name, path in store_dirs.items()}
    heldout_dir = output / "stores" / "heldout"
    heldout = ensure_store(heldout_dir, STORES["main"], setup, setup.heldout_data, setup.heldout_samples)
    run_dirs = {row.name: output / "runs" / row.name for row in rows}
    runs = {}
    for index, row in enumerate(rows, 1):
        log(f"row {index}/{len(rows)}: {row.name}")
        runs[row.name] = run_row(row, train_options(row, setup, store_dirs, heldout_dir, run_dirs[row.name]))
    teacher_metrics, metrics = evaluate_rows(setup, heldout, run_dirs)
    row_bytes = {row.name: target_bytes(row, stores[row.store]) for row in rows}
    table, gap = summarise(setup, runs, metrics, run_dirs, row_bytes)
    train_store = stores[ROWS[0].store]
    device = resolve_device(setup.device)
    report = {
        "format": "quality-benchmark", "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device) | {"device": str(device), "load_average_before": load_before,
                                      "load_average_after": os.getloadavg()},
        "setup": dataclasses.asdict(setup) | {
            "tokens_per_run": setup.steps * setup.batch_size * setup.seq_len,
            "train_store_samples": len(train_store), "epochs": setup.steps * setup.batch_size / len(train_store),
            "heldout_samples": len(heldout), "heldout_tokens": teacher_metrics["tokens"]},
        "teacher": teacher_metrics, "gap": gap, "rows": table, "verdicts": verdicts(table, gap),
        "seconds": time.perf_counter() - began,
    }
    write_atomic(output / "quality.json", (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(output / "quality.md", markdown(report).encode())
    write_atomic(output / "quality.png", chart(report))
    write_atomic(output / "quality_bytes.png", bytes_chart(report))
    return report


def markdown(report: dict) -> str:
    s, m, t = report["setup"], report["machine"], report["teacher"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_before"])
    lines = [
        "## Quality of the target kinds",
        "",
        f"Machine: {m['host']}, {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), GPU "
        f"{m['gpu'] or 'none'}, device {m['device']}; torch {m['torch']}; load average at start {load}.",
        f"Teacher {s['teacher']}; student {s['student_config']}; {s['steps']} steps x {s['batch_size']} samples x "
        f"{s['seq_len']} positions = {s['tokens_per_run']:,} tokens per run ({s['epochs']:.2f} epochs of "
        f"{s['train_store_samples']} samples), lr {s['lr']}, seed {s['seed']}; KD rows: forward_kl={s['alpha']}, "
        f"ce={1 - s['alpha']:.3g}.",
        f"Held-out: {s['heldout_samples']} samples of {s['heldout_data']}, {s['heldout_tokens']:,} tokens; teacher "
        f"LM loss {t['lm_loss']:.4f}, ECE {t['ece']:.4f}. CE -> online gap: {report['gap']:.4f} nats/token.",
        "",
        "| row | target bytes/token | held-out LM loss | ECE | KL(teacher ‖ student) | top-1 agreement | "
        "share of CE -> online gap | wall time (s) | vs CE | train tokens/s | vs CE | load before/after |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        share = "n/a" if r["gap_share"] is None else f"{r['gap_share']:.1%}"
        wall = f"{r['wall_s']:.1f}{' (resumed)' if r['resumed'] else ''}"
        load = "/".join(f"{x:.1f}" for x in r["load_average_1min"])
        nbytes = r.get("target_bytes_per_token")
        nbytes = "-" if nbytes is None else f"{nbytes:.1f}"
        lines.append(f"| {r['label']} | {nbytes} | {r['lm_loss']:.4f} | {r['ece']:.4f} | {r['kl_to_teacher']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {share} | {wall} | {r['wall_vs_ce']:.2f}x | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['tokens_per_s_vs_ce']:.2f}x | {load} |")
    lines += ["", "| target | value | met |", "|:---|---:|:---|"]
    for v in report["verdicts"]:
        value = "n/a" if v["value"] is None else f"{v['value']:.3g}"
        lines.append(f"| {v['target']} | {value} | {'yes' if v['met'] else 'NO'} |")
    lines += ["", "Target bytes/token: the stored bytes per trained token of the records the row trains on (rows that "
              "keep fewer of the stored top-k ids are charged what a store of that k holds).",
              "Wall time: the whole training call (loading, steps, the periodic held-out evaluations every row "
              "shares). Train tokens/s: the median over the run's logged steps. Load: the machine's 1-minute load "
              "average when the run started and ended; times compare only at similar loads."]
    return "\n".join(lines) + "\n"


def chart(report: dict) -> bytes:
    """PNG: held-out LM loss and training CE by step, one line per row; the teacher's held-out loss for reference."""
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    heldout, training = figure.subplots(1, 2)
    for row in report["rows"]:
        for axis, key, marker in ((heldout, "heldout", "o"), (training, "train_ce", None)):
            points = row["curves"][key]
            if points:
                axis.plot(*zip(*points, strict=True), marker=marker, markersize=3, label=row["label"])
    heldout.axhline(report["teacher"]["lm_loss"], color="black", linestyle="--", linewidth=0.8, label="teacher")
    heldout.set(xlabel="optimizer step", ylabel="LM loss (nats/token)", title="Held-out LM loss")
    training.set(xlabel="optimizer step", ylabel="CE on the training batch (nats/token)", title="Training CE")
    for axis in (heldout, training):
        axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


@click.command()
@click.option("--teacher", required=True, help="The teacher's local HF model directory (with its tokenizer).")
@click.option("--train-data", required=True, help="Training text (any file `teacher-cache build --dataset` takes).")
@click.option("--heldout-data", required=True, help="Held-out text, kept apart from the training text.")
@click.option("--student-config", required=True, help="The student: an HF config (or model directory) with the "
                                                       "teacher's tokenizer; every row starts from the same init.")
@click.option("--output", required=True, help="Directory of the stores, the runs and quality.{md,json,png}.")
@click.option("--steps", type=int, required=True, help="Optimizer steps per run.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per step.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Positions per sample.")
@click.option("--alpha", type=float, default=0.9, show_default=True, help="KD rows: forward_kl=ALPHA ce=1-ALPHA.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the student's init and data order.")
@click.option("--train-samples", type=int,
              help="Samples in the training store: the first ones of --train-data (give a file in random order, or "
                   "one as varied as the held-out text). Default: steps x batch size, one epoch.")
@click.option("--heldout-samples", type=int, help="Samples in the held-out store. Default: all of --heldout-data.")
@click.option("--eval-every", type=int, help="Held-out evaluation every N steps (the curves). Default: steps / 10.")
@click.option("--save-every", type=int, help="Checkpoint every N steps (an interrupted run resumes from the last). "
                                            "Default: steps / 4.")
@click.option("--device", default="auto", show_default=True)
@click.option("--chunk-positions", type=int, default=256, show_default=True)
@click.option("--build-batch-size", type=int, default=8, show_default=True, help="Samples per teacher forward.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--rows", default=",".join(row.name for row in ROWS), show_default=True,
              help="Rows to run, comma-separated (ce and online always run: they define the gap).")
def main(rows: str, **options) -> None:
    """Train one student per target kind on the same budget and compare them on held-out text."""
    try:
        setup = QualitySetup(rows=tuple(name.strip() for name in rows.split(",") if name.strip()), **options)
        report = run_quality(setup)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(markdown(report))
    click.echo(f"Written to {setup.output}: quality.md, quality.json, quality.png.")


def bytes_chart(report: dict) -> bytes:
    """PNG: each cached row's share of the CE -> online gap against the bytes per token of its targets."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axis = figure.subplots()
    points = [row for row in report["rows"]
              if row.get("target_bytes_per_token") and row["gap_share"] is not None]
    for index, row in enumerate(sorted(points, key=lambda row: row["target_bytes_per_token"])):
        marker = "^" if _systematic(row) else "s" if row["name"].startswith("hybrid") else "o"
        axis.scatter(row["target_bytes_per_token"], 100 * row["gap_share"], marker=marker)
        # Labels alternate above and below their points, so that neighbours on the curve stay readable.
        axis.annotate(row["label"], (row["target_bytes_per_token"], 100 * row["gap_share"]), fontsize=7,
                      xytext=(5, 6 if index % 2 else -11), textcoords="offset points")
    hybrids = sorted((row for row in points if row["name"].startswith("hybrid") and not _systematic(row)),
                     key=lambda row: row["target_bytes_per_token"])
    if len(hybrids) > 1:
        axis.plot([r["target_bytes_per_token"] for r in hybrids], [100 * r["gap_share"] for r in hybrids],
                  linestyle="--", linewidth=0.8, color="grey")
    axis.axhline(100, color="black", linewidth=0.8, linestyle=":", label="online full KD")
    axis.axhline(0, color="red", linewidth=0.8, linestyle=":", label="CE only")
    axis.set_xscale("log")
    axis.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000)
                     if min(r["target_bytes_per_token"] for r in points) / 2 <= t
                     <= 2 * max(r["target_bytes_per_token"] for r in points)] if points else [])
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set(xlabel="stored target bytes per token (log scale)", ylabel="share of the CE -> online gap (%)",
             title="Bytes vs quality of the target kinds")
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _systematic(row: dict) -> bool:
    """Whether a report row trains on systematic draws (its store's spec says so)."""
    return STORES[next(r.store for r in ROWS if r.name == row["name"])].draw_scheme == SYSTEMATIC


if __name__ == "__main__":
    main()
