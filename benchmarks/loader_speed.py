"""Loader speed: trained tokens/s the store loader decodes and collates, against what a `student-train` step consumes.

The loader must never be what a training run waits on. Three measurements on one store, in one run:
  - loader: `StoreLoader` exactly as `student-train` configures it (its `LoaderConfig`: shuffle, held-out tail,
    prefetch), iterated over a whole epoch with nothing else running, for each `--workers` count. The loader decodes
    every array of the store (top-k, sampled, statistics inputs), whatever `--targets-from` trains on. Each worker
    count is measured with the store's checksums verified (the default: every file hashed before its first read,
    and every epoch here starts with nothing verified, as a training run's first epoch does) and with
    `--no-verify`. Reported: tokens/s over the epoch (worker start-up included) and from the second batch on
    (steady state), and the seconds to the first batch.
  - consumption: `student-train`'s own training step (`Trainer._train_step`: student forward, chunked loss, backward,
    gradient clipping, AdamW) on batches already in memory, one untimed warm-up step, then `--steps` timed ones.
  - fed by the loader: the same steps pulling their batches from the loader, as `student-train` does; the share of
    the wall time spent waiting for a batch. On a machine with few cores the loader's decoding competes with the
    step for them, which the first two rows do not show.
The ratio loader / consumption is the headroom (target: at least 10x). Tokens are trained tokens (loss-mask
positions), what the trainer's `tokens_per_s` counts. Each loader figure is the best of `--repeats` epochs and each
step time the best step, so both are the uncontended speeds on a shared machine; the 1-min load average is recorded.

Point it at a store and a student:

    python benchmarks/loader_speed.py .demo/cache-train [--student .demo/student-config] [--batch-size 8] \\
        [--workers 0,2] [--targets-from topk_tail] [--loss forward_kl=0.9,ce=0.1] [--steps 10] [--device auto]

`make demo` leaves a realistic store in .demo/cache-train (a trained 5.3M teacher, vocabulary 4096, seq_len 256,
top-64 + tail and 50 draws, 600 samples) and the 1.4M student it trains in .demo/student-config. Without
`--student`, a random student of that shape is built from a config with the store's vocabulary. To build a store
first (kept in STORE for later runs), name a teacher: `--build-from TEACHER_DIR [--dataset FILE --seq-len 256
--samples 600]`. The JSON goes to benchmarks/results/loader_speed.json unless --json says otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import torch
from transformers import LlamaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine_info import machine  # noqa: E402
from storage import integrity  # noqa: E402
from storage.reader import Store  # noqa: E402
from student_train.config import TrainConfig  # noqa: E402
from student_train.loader import LoaderConfig, StoreLoader  # noqa: E402
from student_train.train import Trainer  # noqa: E402
from teacher_cache import BuildConfig, build_cache  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
# The student `make demo` trains (tools/demo.py), built with the store's vocabulary when --student is not given.
DEMO_STUDENT = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4}


def default_student(path: Path, store: Store) -> str:
    """A config-only Llama of the demo student's shape; its tokenizer is the store's teacher's."""
    manifest = store.manifest
    LlamaConfig(vocab_size=manifest.teacher["vocab_size"], max_position_embeddings=manifest.build["seq_len"],
                tie_word_embeddings=False, **DEMO_STUDENT).save_pretrained(path)
    return str(path)


def loader_epoch(config: LoaderConfig) -> dict:
    """One epoch of a fresh loader: seconds, seconds to the first batch, and what it delivered.

    No file counts as verified at the start (a process verifies each file once), so a verifying epoch hashes them all.
    """
    integrity._VERIFIED.clear()
    began = time.perf_counter()
    first = None
    tokens = samples = batches = first_tokens = 0
    for batch in StoreLoader(config):
        if first is None:
            first, first_tokens = time.perf_counter() - began, int(batch["loss_mask"].sum())
        tokens += int(batch["loss_mask"].sum())
        samples += len(batch["sample_ids"])
        batches += 1
    seconds = time.perf_counter() - began
    steady = (tokens - first_tokens) / (seconds - first) if batches > 1 else float("nan")
    return {"seconds": seconds, "first_batch_s": first, "tokens": tokens, "samples": samples, "batches": batches,
            "tokens_per_s": tokens / seconds, "steady_tokens_per_s": steady}


def best_epoch(config: LoaderConfig, repeats: int) -> dict:
    runs = [loader_epoch(config) for _ in range(repeats)]
    best = min(runs, key=lambda run: run["seconds"])
    return best | {"steady_tokens_per_s": max(run["steady_tokens_per_s"] for run in runs),
                   "first_batch_s": min(run["first_batch_s"] for run in runs)}


def timed_step(trainer: Trainer, batches: Iterator) -> tuple[float, int]:
    """Seconds and trained tokens of one `student-train` step taking its batches from `batches`."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    sync()
    began = time.perf_counter()
    stats = trainer._train_step(batches)  # the step `Trainer.run` takes, without logging or checkpoints
    sync()
    return time.perf_counter() - began, stats["tokens"]


def consumption(trainer: Trainer, batches: list[dict], steps: int) -> dict:
    """Trained tokens/s of `steps` training steps on batches in memory (after one warm-up step), best step kept."""
    timed_step(trainer, iter(batches[:1]))
    times = [timed_step(trainer, iter([batch])) for batch in itertools.islice(itertools.cycle(batches[1:]), steps)]
    best = min(times, key=lambda t: t[0] / t[1])
    return {"tokens_per_s": best[1] / best[0], "mean_tokens_per_s": sum(n for _, n in times) / sum(t for t, _ in times),
            "step_s": [t for t, _ in times],
            "tokens": [n for _, n in times], "median_step_s": sorted(t for t, _ in times)[len(times) // 2]}


def fed_by_loader(trainer: Trainer, config: LoaderConfig, steps: int) -> dict:
    """`steps` training steps pulling batches from a fresh loader (after a warm-up step): wall time and waits."""
    waited = [0.0]

    def batches() -> Iterator[dict]:
        source = iter(StoreLoader(config))
        while True:
            began = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                source = iter(StoreLoader(config))
                continue
            waited[0] += time.perf_counter() - began
            yield batch

    stream = batches()
    timed_step(trainer, stream)
    waited[0] = 0.0
    began = time.perf_counter()
    tokens = sum(timed_step(trainer, stream)[1] for _ in range(steps))
    seconds = time.perf_counter() - began
    return {"workers": config.num_workers, "steps": steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "wait_s": waited[0], "wait_share": waited[0] / seconds}


def build_store(store: str, teacher: str, dataset: str, seq_len: int, samples: int) -> None:
    click.echo(f"building {store} from {teacher} ({samples} samples of {seq_len} tokens) ...")
    build_cache(BuildConfig(model=teacher, dataset=dataset, output=store, seq_len=seq_len, max_samples=samples,
                            batch_size=8))


def print_table(result: dict) -> None:
    info, opts, store = result["machine"], result["options"], result["store"]
    click.echo(f"\n{info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}; torch {info['torch']}; 1-min load "
               "average {:.1f} at the start, {:.1f} at the end".format(*info["load_average"]))
    student = opts["student"] if isinstance(opts["student"], str) else "random, the demo student's shape"
    click.echo(f"store {opts['store']}: {store['samples']} samples x {store['seq_len']}, vocab {store['vocab_size']}, "
               f"targets {', '.join(store['targets'])}; student {student} "
               f"({result['student_parameters'] / 1e6:.1f}M parameters) on {opts['device']}, loss "
               f"{' + '.join(result['loss'])} over {result['targets_from']} targets, batch {opts['batch_size']}\n")
    rate = result["consumption"]["tokens_per_s"]
    click.echo("| what | workers | checksums | tokens/s | vs consumption | steady tokens/s | vs consumption | first "
               "batch s |")
    click.echo("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in result["loader"]:
        click.echo(f"| loader, one epoch ({row['batches']} batches) | {row['workers']} | "
                   f"{'verified' if row['verify'] else 'not verified'} | {row['tokens_per_s']:,.0f} | "
                   f"{row['tokens_per_s'] / rate:.1f}x | {row['steady_tokens_per_s']:,.0f} | "
                   f"{row['steady_tokens_per_s'] / rate:.1f}x | {row['first_batch_s']:.2f} |")
    click.echo(f"| student-train step, batches in memory | - | - | {rate:,.0f} | 1.0x | | | |")
    click.echo("\n| student-train steps | workers | tokens/s (mean) | waiting for a batch |")
    click.echo("|---|---:|---:|---:|")
    used = result["consumption"]
    click.echo(f"| {len(used['step_s'])} steps, batches in memory | - | {used['mean_tokens_per_s']:,.0f} | - |")
    for row in result["fed_by_loader"]:
        click.echo(f"| {row['steps']} steps fed by the loader | {row['workers']} | {row['tokens_per_s']:,.0f} | "
                   f"{100 * row['wait_share']:.1f}% ({row['wait_s']:.2f} of {row['seconds']:.1f} s) |")


@click.command()
@click.argument("store")
@click.option("--student", help="Student model directory or config (as `student-train --student`). Default: a random "
              "student of the demo's shape (width 128, 2 layers) with the store's vocabulary.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per batch (student-train's).")
@click.option("--workers", default="0,2", show_default=True, help="Loader worker counts to measure, comma-separated.")
@click.option("--targets-from", help="Target representation of the loss (student-train's default when not given).")
@click.option("--loss", default="", help="Loss terms, e.g. forward_kl=0.9,ce=0.1 (student-train's default when empty).")
@click.option("--steps", type=int, default=10, show_default=True, help="Timed training steps (after one warm-up).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Loader epochs per worker count; best kept.")
@click.option("--device", default="auto", show_default=True, help="Device of the training step: auto, cpu, cuda.")
@click.option("--build-from", help="Teacher directory: build STORE with it first, unless STORE already holds a store.")
@click.option("--dataset", default=str(DATA / "tinyshakespeare.txt"), show_default=True, help="Text of --build-from.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="seq_len of --build-from.")
@click.option("--samples", type=int, default=600, show_default=True, help="Samples of --build-from.")
@click.option("--json", "json_path", default=str(RESULTS / "loader_speed.json"), show_default=True)
def main(store: str, student: str | None, batch_size: int, workers: str, targets_from: str | None, loss: str,
         steps: int, repeats: int, device: str, build_from: str | None, dataset: str, seq_len: int, samples: int,
         json_path: str) -> None:
    """Print trained tokens/s of the store loader against a student-train step's consumption on the same store."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    worker_counts = [int(w) for w in workers.split(",") if w.strip()]
    if build_from and not (Path(store) / "manifest.json").exists():
        build_store(store, build_from, dataset, seq_len, samples)
    load_before = os.getloadavg()[0]
    opened = Store(store)
    with tempfile.TemporaryDirectory(prefix="loader-speed-") as scratch:
        student_path = student or default_student(Path(scratch) / "student", opened)
        config = TrainConfig(store=store, student=student_path, output=str(Path(scratch) / "run"),
                             batch_size=batch_size, targets_from=targets_from, loss=[t for t in loss.split(",") if t],
                             device=device)
        trainer = Trainer(config)
        loader_config = trainer.train_loader.config  # student-train's own loader options
        rows = [{"workers": w, "verify": verify,
                 **best_epoch(dataclasses.replace(loader_config, num_workers=w, verify=verify), repeats)}
                for w in worker_counts for verify in (True, False)]
        in_memory = list(itertools.islice(StoreLoader(loader_config), min(steps + 1, len(trainer.train_loader))))
        used = consumption(trainer, in_memory, steps)
        fed = [fed_by_loader(trainer, dataclasses.replace(loader_config, num_workers=w), steps) for w in worker_counts]
    manifest = opened.manifest
    result = {
        "machine": machine(trainer.device) | {"load_average": [load_before, os.getloadavg()[0]]},
        "options": {"store": store, "student": student or {"random_llama": DEMO_STUDENT}, "batch_size": batch_size,
                    "workers": worker_counts, "steps": steps, "repeats": repeats, "device": str(trainer.device)},
        "store": {"samples": len(opened), "seq_len": manifest.build["seq_len"],
                  "vocab_size": manifest.teacher["vocab_size"], "targets": sorted(manifest.targets),
                  "train_samples": trainer.train_loader.order.num_samples},
        "student_parameters": trainer.model.num_parameters(), "loss": config.loss,
        "targets_from": trainer.loss_config.targets, "loader": rows, "consumption": used, "fed_by_loader": fed,
    }
    print_table(result)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
