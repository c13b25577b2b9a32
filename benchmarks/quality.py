"""Quality of the target kinds: one student trained on the same batches and token budget with CE only, with each kind
of cached target, and with online full-logit KD, then evaluated on held-out text; every row once per seed.

Flow: build (or reuse) a training store and a held-out store from the teacher (`teacher_cache.build_cache`: top-64
+ tail and N = 50 draws in one store; the rows' other stores, `quality_rows.STORES`) -> with --student-init, the
student pruned from the teacher (`student-init --keep-layers`) -> for each seed and row, `student_train.train` into
OUTPUT/runs/seed-S/ROW (same student, batch size, steps and samples; the seed sets the student's random init and the
data order; a finished run is reused, an interrupted one resumed from its last checkpoint) -> every student and the
teacher scored on the whole held-out store by the evaluation code of `student-train eval`
(`student_train.evaluate.score`: LM loss, KL(teacher || student) exact over the vocabulary, top-1 agreement, ECE of
the top-1 prediction) -> each row's mean and spread over the seeds (`quality_report`) -> OUTPUT/quality.{md,json,png}.

Rows (`quality_rows.ROWS`; KD rows train on forward_kl=ALPHA, ce=1-ALPHA):
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

Each row reports, as the mean over the seeds ± half their range (every seed's values are in the JSON, `per_seed`):
its held-out LM loss, ECE, KL to the teacher, top-1 agreement, and the share of the CE -> online gap it closes,
(loss_ce - loss_row) / (loss_ce - loss_online), computed per seed against that seed's CE and online runs, then
averaged (undefined when online is not better than CE in some seed); its wall time (the whole `train` call: loading,
steps and the periodic held-out evaluations, which every row shares) and median training tokens/s, each relative to
that seed's CE run; and the stored bytes per token of the records it trains on (`target_bytes`). Targets checked on
the means: sampled >= 95% of the gap, top-64 + tail >= 90%, hybrid (top-64 + 50) >= 97% (either draw scheme), no
row's ECE above CE's, cached KD's run time <= 1.1x CE's, some row at <= 50 B/token closing >= 95%.
quality_bytes.png plots each cached row's gap share against its bytes per token (triangles: systematic draws);
quality.png shows each row's held-out LM loss (its metrics.jsonl `eval` records, every --eval-every steps) and
training CE by step, averaged over the seeds.

    python benchmarks/quality.py --teacher .demo/teacher --train-data .demo/teacher/corpus/train.jsonl \\
        --heldout-data .demo/teacher/corpus/heldout.jsonl --student-config .demo/student-config \\
        --steps 200 --batch-size 8 --seq-len 256 --output runs/quality

A real teacher, SmolLM2-135M-Instruct (`make smollm2`), with its 6-layer prune as the student (`--student-init`,
as `student-init --keep-layers`; every seed starts from that same student, so the seeds differ in data order alone)
and the rows of `quality_rows.REAL_TEACHER_ROWS` (CE, online, top-64 + tail, sampled N = 50 and hybrid (64, 50),
both draw schemes), on Shakespeare from the demo corpus:

    make smollm2
    python -c "import pathlib, tools.demo_teacher as d; d.build_corpus(pathlib.Path('.demo/corpus'))"
    python benchmarks/quality.py --teacher .demo/smollm2 --student-init 0,6,12,18,24,29 \\
        --train-data .demo/corpus/train.jsonl --heldout-data .demo/corpus/heldout.jsonl --rows real-teacher \\
        --steps 24 --batch-size 4 --seq-len 256 --lr 5e-4 --heldout-samples 16 --eval-every 8 --device cpu \\
        --output .bench/quality-smollm2

About 35 minutes on a 2-core CPU, an estimate from throughputs in benchmarks/RESULTS.md (builds at 295 tokens/s,
section 3; this student's training at ~450 positions/s with the loss on a quarter of them, section 8, so ~300
tokens/s with the loss on all; online KD adds the teacher's forward, ~380 tokens/s): four training stores of 24,576
tokens and the held-out one of 4,096 ~6 minutes, 12 cached-KD runs ~17, 2 online runs ~5, scoring 14 students
beside the teacher ~4, their periodic held-out evaluations ~3.

Run it again with the same options to reuse every finished store, student, run and evaluation (and to finish the
rest); more seeds add runs beside the finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality_report import aggregate, bytes_chart, chart, markdown, seed_rows, verdicts  # noqa: E402
from benchmarks.quality_rows import (  # noqa: E402
    CE_ROW,
    FULL_ROW,
    REAL_TEACHER_ROWS,
    ROWS,
    STORES,
    RowSpec,
    StoreSpec,
    target_bytes,
)
from storage.causal_lm import resolve_device  # noqa: E402
from storage.fs import Location  # noqa: E402
from storage.manifest import Manifest  # noqa: E402
from storage.reader import Store  # noqa: E402
from storage.targets.sampled import draw_scheme, draws_from_tail  # noqa: E402
from student_train.checkpoint import latest_checkpoint  # noqa: E402
from student_train.config import TrainConfig  # noqa: E402
from student_train.eval_report import write_atomic  # noqa: E402
from student_train.evaluate import read_rows, score  # noqa: E402
from student_train.prune_cli import REPORT_NAME, StudentInitConfig, prune_teacher  # noqa: E402
from student_train.train import train  # noqa: E402
from teacher_cache.build import build_cache  # noqa: E402
from teacher_cache.config import BuildConfig  # noqa: E402
from teacher_cache.teacher import TransformersTeacher  # noqa: E402

REPORT_VERSION = 2  # 2: rows are means over seeds, with `spread` and `per_seed`
RUN_RECORD = "quality_run.json"  # written when a row's training finished: its options, wall time
EVAL_RECORD = "quality_eval.json"  # the row's held-out metrics
ROW_SETS = {"real-teacher": REAL_TEACHER_ROWS}  # names --rows takes for a set of rows


@dataclass(kw_only=True)
class QualitySetup:
    """What every row shares; see `main` for each option."""

    teacher: str
    train_data: str
    heldout_data: str
    output: str
    steps: int
    batch_size: int
    seq_len: int
    student_config: str | None = None
    student_init: tuple[int, ...] | None = None
    alpha: float = 0.9
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1)
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
        if (self.student_config is None) == (self.student_init is None):
            raise ValueError("--student-config or --student-init: give one, a student config (random init) or the "
                             "teacher's layers to keep (a pruned init).")
        if not self.seeds or len(set(self.seeds)) < len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds: expected distinct seeds >= 0 (e.g. 0,1), got {list(self.seeds)}.")
        rows = [name for entry in self.rows for name in ROW_SETS.get(entry, (entry,))]
        known = [row.name for row in ROWS]
        unknown = [name for name in rows if name not in known]
        if unknown:
            raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(known)}, or the "
                             f"set {', '.join(ROW_SETS)}.")
        self.rows = tuple(name for name in known if name in {*rows, CE_ROW, FULL_ROW})  # the gap's ends always
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
                            dtype=model_dtype(resolve_device(setup.device)), resume=path.exists()))
    return Store(path)


def _target_kinds(targets: dict) -> tuple[str, ...]:
    """The build's --targets of a store, from its manifest's targets section."""
    if draws_from_tail(targets):
        return ("hybrid",)
    return tuple(kind for kind in ("topk", "sampled") if kind in targets)


def ensure_student(setup: QualitySetup) -> str:
    """The student every row starts from: --student-config, or with --student-init the teacher's kept layers
    (`student-init`), pruned into OUTPUT/student-init unless a student of the same layers is there.

    Raises:
        ValueError: the student there kept other layers of the teacher, or is of another teacher.
    """
    if setup.student_init is None:
        return setup.student_config
    path, layers = Path(setup.output) / "student-init", list(setup.student_init)
    if (path / REPORT_NAME).exists():
        config = json.loads((path / REPORT_NAME).read_text())["config"]
        if (config["teacher"], config["keep_layers"]) != (setup.teacher, layers):
            raise ValueError(f"{path} holds a student of the layers {config['keep_layers']} of {config['teacher']}; "
                             "choose another --output.")
        log(f"student {path}: reused (layers {layers})")
        return str(path)
    log(f"student {path}: keeping the teacher's layers {layers}")
    prune_teacher(StudentInitConfig(teacher=setup.teacher, output=str(path), keep_layers=layers, device=setup.device))
    return str(path)


def train_options(row: RowSpec, setup: QualitySetup, student: str, seed: int, stores: dict[str, Path], heldout: Path,
                  output: Path) -> dict:
    """The TrainConfig options of a row's run with `seed`: the shared ones, then the row's."""
    options = dict(store=str(stores[row.store]), student=student, output=str(output), batch_size=setup.batch_size,
                   max_steps=setup.steps, lr=setup.lr, seed=seed, eval_store=str(heldout),
                   eval_every=setup.eval_every, save_every=setup.save_every, log_every=1, keep_checkpoints=1,
                   device=setup.device, chunk_positions=setup.chunk_positions, alpha=setup.alpha if row.kd else 0.0)
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
    log(f"{row.name}: {'resuming' if resume else 'training'} ({row.label}, seed {options['seed']}, "
        f"{options['max_steps']} steps)")
    load_before, began = os.getloadavg()[0], time.perf_counter()
    train(TrainConfig(**options, resume=resume))
    record = {"options": comparable, "wall_s": time.perf_counter() - began, "resumed": resume,
              "load_average_1min": [load_before, os.getloadavg()[0]]}
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    (output / EVAL_RECORD).unlink(missing_ok=True)
    log(f"{row.name}: trained in {record['wall_s']:.1f} s")
    return record


def model_dtype(device: torch.device) -> str:
    """The teacher's dtype for its stores and the scoring alike: float32 on CPU (`--dtype auto` would pick bfloat16
    on CPUs with AMX, and the cached rows would learn another teacher than the one scored and the online row's)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def evaluate_runs(setup: QualitySetup, heldout: Store, run_dirs: list[Path]) -> tuple[dict, dict[Path, dict]]:
    """(the teacher's held-out metrics, each run's), both models scored by `student_train.evaluate.score`."""
    device = resolve_device(setup.device)
    dtype = model_dtype(device)
    rows = read_rows(heldout, 0, len(heldout))
    teacher_cache_path = Path(setup.output) / "teacher_eval.json"
    results, teacher_metrics, teacher = {}, None, None
    if teacher_cache_path.exists():
        teacher_metrics = json.loads(teacher_cache_path.read_text())
    for run_dir in run_dirs:
        cached = run_dir / EVAL_RECORD
        if cached.exists():
            results[run_dir] = json.loads(cached.read_text())
            continue
        log(f"{run_dir}: scoring the student and the teacher on {len(rows)} held-out rows")
        teacher = teacher or TransformersTeacher(setup.teacher, device=str(device), dtype=dtype)
        student = TransformersTeacher(str(run_dir), device=str(device), dtype=dtype)
        metrics = score(teacher, student, rows, batch_size=setup.batch_size,
                        chunk_positions=setup.chunk_positions).result()
        results[run_dir] = _without_diagram(metrics["student"])
        teacher_metrics = _without_diagram(metrics["teacher"])
        write_atomic(cached, json.dumps(results[run_dir], indent=1).encode())
        write_atomic(teacher_cache_path, json.dumps(teacher_metrics, indent=1).encode())
    return teacher_metrics, results


def _without_diagram(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "reliability"}


def machine(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"host": platform.node(), "cpu": names[0] if names else platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run_quality(setup: QualitySetup) -> dict:
    """Build the stores and the student, train and evaluate every row with every seed (reusing what is done), write
    the report; returns it."""
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
    student = ensure_student(setup)
    run_dirs = {seed: {row.name: output / "runs" / f"seed-{seed}" / row.name for row in rows} for seed in setup.seeds}
    runs = {seed: {} for seed in setup.seeds}
    for seed in setup.seeds:
        for index, row in enumerate(rows, 1):
            log(f"seed {seed}, row {index}/{len(rows)}: {row.name}")
            options = train_options(row, setup, student, seed, store_dirs, heldout_dir, run_dirs[seed][row.name])
            runs[seed][row.name] = run_row(row, options)
    teacher_metrics, metrics = evaluate_runs(setup, heldout, [d for dirs in run_dirs.values() for d in dirs.values()])
    per_seed, gaps = {}, {}
    for seed, dirs in run_dirs.items():
        per_seed[seed], gaps[str(seed)] = seed_rows(rows, runs[seed], {name: metrics[d] for name, d in dirs.items()},
                                                    dirs)
    table = aggregate(rows, per_seed, {row.name: target_bytes(row, stores[row.store]) for row in rows})
    train_store = stores[ROWS[0].store]
    device = resolve_device(setup.device)
    report = {
        "format": "quality-benchmark", "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device) | {"device": str(device), "load_average_before": load_before,
                                      "load_average_after": os.getloadavg()},
        "setup": dataclasses.asdict(setup) | {
            "student": student, "tokens_per_run": setup.steps * setup.batch_size * setup.seq_len,
            "train_store_samples": len(train_store), "epochs": setup.steps * setup.batch_size / len(train_store),
            "heldout_samples": len(heldout), "heldout_tokens": teacher_metrics["tokens"]},
        "teacher": teacher_metrics, "gap": sum(gaps.values()) / len(gaps), "gaps": gaps, "rows": table,
        "verdicts": verdicts(table, gaps), "seconds": time.perf_counter() - began,
    }
    write_atomic(output / "quality.json", (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(output / "quality.md", markdown(report).encode())
    write_atomic(output / "quality.png", chart(report))
    write_atomic(output / "quality_bytes.png", bytes_chart(report))
    return report


def _int_list(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option}: expected integers separated by commas (e.g. 0,1), got {text!r}.") from None


@click.command()
@click.option("--teacher", required=True, help="The teacher's local HF model directory (with its tokenizer).")
@click.option("--train-data", required=True, help="Training text (any file `teacher-cache build --dataset` takes).")
@click.option("--heldout-data", required=True, help="Held-out text, kept apart from the training text.")
@click.option("--student-config", help="The student: an HF config (or model directory) with the teacher's tokenizer; "
                                       "every row starts from the same init of a seed. Not with --student-init.")
@click.option("--student-init", metavar="I,J,...",
              help="Instead of --student-config: the teacher's layers the student keeps (`student-init "
                   "--keep-layers`, e.g. 0,6,12,18,24,29), pruned once into OUTPUT/student-init.")
@click.option("--output", required=True, help="Directory of the stores, the runs and quality.{md,json,png}.")
@click.option("--steps", type=int, required=True, help="Optimizer steps per run.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per step.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Positions per sample.")
@click.option("--alpha", type=float, default=0.9, show_default=True, help="KD rows: forward_kl=ALPHA ce=1-ALPHA.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seeds", default="0,1", show_default=True,
              help="Seeds, comma-separated: every row is trained once per seed (the student's random init and the "
                   "data order); the report gives the mean and spread over them.")
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
              help="Rows to run, comma-separated (ce and online always run: they define the gap); `real-teacher` "
                   f"names {', '.join(REAL_TEACHER_ROWS)}.")
def main(rows: str, seeds: str, student_init: str | None, **options) -> None:
    """Train one student per target kind and seed on the same budget and compare them on held-out text."""
    try:
        setup = QualitySetup(rows=tuple(name.strip() for name in rows.split(",") if name.strip()),
                             seeds=_int_list("--seeds", seeds),
                             student_init=None if student_init is None else _int_list("--student-init", student_init),
                             **options)
        report = run_quality(setup)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(markdown(report))
    click.echo(f"Written to {setup.output}: quality.md, quality.json, quality.png, quality_bytes.png.")


if __name__ == "__main__":
    main()
