"""Speed of `teacher-cache inspect` (and `select`) on a store of a million samples, against baselines in the same run.

`inspect` and `select` read only the per-sample statistics arrays (`stats_*`, format version 2), so their cost
grows with the number of samples and shards, not with the sequence length or k. The store is therefore built
cheaply: tiny samples (seq_len 4, top-2 targets) in shards of a realistic sample count (512 samples: a shard of
about 1M positions at seq_len 2048, the build's default). A few distinct shards are written by `StoreWriter` from
synthetic records, the others are file copies of them listed in one manifest (the group attribute `shard_index` of
a copy is its template's; nothing here reads it). Pass `--store` to keep the store and reuse it in later runs.

Rows, each timed `--repeats` times (best kept; the page cache is warm, as just after a build):
- inspect: `Store` + `inspect_store` + the text and JSON reports, what the command does;
- select: `select_samples --by entropy --top 0.3` writing its file;
- baseline, zarr only: the stats arrays read with `json` + `zarr` alone, following FORMAT.md (the floor);
- baseline, from targets: the statistics computed from the targets instead (what a version 1 store costs), on the
  first `--v1-shards` shards of the same tiny store, and on a store of realistic shape (seq_len 2048, k = 64),
  whose targets are what dominates then.

    python benchmarks/inspect_speed.py [--samples 1048576] [--samples-per-shard 512] [--store PATH] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage import Manifest, StoreWriter  # noqa: E402
from storage.inspection import format_report, inspect_store  # noqa: E402
from storage.layout import shard_name  # noqa: E402
from storage.reader import Store  # noqa: E402
from storage.selection import SelectConfig, select_samples  # noqa: E402
from storage.targets import stat_names  # noqa: E402

TEMPLATES = 16


def synthetic_record(rng: np.random.Generator, samples: int, seq_len: int, k: int, vocab: int) -> dict:
    """Random targets of the store's shapes; about 1% of the samples have no trained position."""
    loss_mask = rng.random((samples, seq_len)) < 0.95
    loss_mask[rng.random(samples) < 0.01] = False
    topk_ids = np.sort(rng.integers(0, vocab, (samples, seq_len, k)), axis=-1)  # repeats do not matter here
    return {
        "input_ids": rng.integers(0, vocab, (samples, seq_len + 1)).astype(np.uint16),
        "attention_mask": np.ones((samples, seq_len + 1), bool),
        "loss_mask": loss_mask,
        "segment_ids": np.zeros((samples, seq_len + 1), np.uint16),
        "entropy": (rng.random((samples, seq_len), dtype=np.float32) * 4) * loss_mask,
        "true_logprob": (-rng.random((samples, seq_len), dtype=np.float32) * 6) * loss_mask,
        "topk_ids": topk_ids.astype(np.uint16),
        "topk_logprobs": (-rng.random((samples, seq_len, k)) * 8).astype(np.float32),
        "tail_logmass": np.log(rng.random((samples, seq_len)) * 0.5 + 1e-3).astype(np.float32),
    }


def build_store(path: Path, samples: int, per_shard: int, *, seq_len: int = 4, k: int = 2, version: int = 2,
                templates: int = TEMPLATES) -> None:
    """`samples` samples in shards of `per_shard`: `templates` written by StoreWriter, the rest copies of them."""
    manifest = Manifest(teacher={"vocab_size": 32000, "model": "synthetic"}, dataset={"source": "synthetic"},
                        build={"seq_len": seq_len, "samples_per_shard": per_shard}, targets={"topk": {"k": k}},
                        format_version=version)
    writer = StoreWriter.open(path, manifest, resume=False)
    sizes = [min(per_shard, samples - start) for start in range(0, samples, per_shard)]
    rng = np.random.default_rng(0)
    written = [writer.write_shard(j, synthetic_record(rng, sizes[j], seq_len, k, 32000))
               for j in range(min(templates, len(sizes)))]
    for j in range(len(written), len(sizes)):
        template = written[j % len(written)] if sizes[j] == per_shard else None
        if template is None:  # a short last shard is written, not copied
            writer.write_shard(j, synthetic_record(rng, sizes[j], seq_len, k, 32000))
            continue
        shutil.copytree(path / template.name, path / shard_name(j))
        writer.manifest.shards.append(replace(template, name=shard_name(j)))
    writer.finish()


def read_stats_with_zarr(path: Path) -> dict[str, np.ndarray]:
    """The stats arrays of every shard with json + zarr alone (FORMAT.md, "Reading with zarr alone")."""
    manifest = json.loads((path / "manifest.json").read_text())
    names = stat_names(manifest["targets"])
    parts = {name: [] for name in names}
    for shard in manifest["shards"]:
        group = zarr.open_group(str(path / shard["name"]), mode="r", zarr_format=3)
        for name in names:
            parts[name].append(group[name][:])
    return {name: np.concatenate(p) for name, p in parts.items()}


def stats_from_targets(path: Path, shards: int) -> int:
    """Compute the statistics of the first `shards` shards from their targets (the version 1 path)."""
    store = Store(path)
    for shard in store.shards[:shards]:
        shard.stored_stats = False
        shard.stats()
    return sum(len(s) for s in store.shards[:shards])


def best_of(repeats: int, function) -> tuple[float, object]:
    """(seconds, result) of the fastest of `repeats` calls."""
    best = (float("inf"), None)
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, (time.perf_counter() - start, result), key=lambda pair: pair[0])
    return best


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, Python "
            f"{platform.python_version()}, zarr {zarr.__version__}, numpy {np.__version__}; load average {load}")


@click.command()
@click.option("--samples", type=int, default=1 << 20, show_default=True, help="Samples in the store.")
@click.option("--samples-per-shard", type=int, default=512, show_default=True)
@click.option("--store", "store_path", type=click.Path(file_okay=False),
              help="Build the store here and keep it; reused when it already holds one. Default: a temporary one.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timings per row; the best is kept.")
@click.option("--v1-shards", type=int, default=256, show_default=True,
              help="Shards of the tiny store whose statistics are computed from targets for the baseline.")
@click.option("--json", "json_path", help="Also write the rows as JSON here.")
def main(samples: int, samples_per_shard: int, store_path: str | None, repeats: int, v1_shards: int,
         json_path: str | None) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="inspect-speed-"))
    path = Path(store_path) if store_path else scratch / "store"
    try:
        if (path / "manifest.json").exists():
            click.echo(f"reusing {path}")
        else:
            start = time.perf_counter()
            build_store(path, samples, samples_per_shard)
            click.echo(f"built {path} in {time.perf_counter() - start:.0f} s")
        store = Store(path)
        total = len(store)
        click.echo(f"{total:,} samples in {len(store.shards):,} shards; machine: {machine()}")

        def inspect() -> dict:
            inspection = inspect_store(Store(path))
            format_report(inspection.report)
            json.dumps(inspection.report)
            return inspection.report

        def select() -> dict:
            output = scratch / "selection.json"
            return select_samples(SelectConfig(store=str(path), output=str(output), key="entropy", top=0.3,
                                               force=True))

        rows = []
        seconds, report = best_of(repeats, inspect)
        rows.append(("`teacher-cache inspect` (stats arrays)", total, seconds))
        seconds, _ = best_of(repeats, select)
        rows.append(("`teacher-cache select --by entropy --top 0.3`", total, seconds))
        seconds, stats = best_of(repeats, lambda: read_stats_with_zarr(path))
        assert np.array_equal(stats["stats_num_tokens"], Store(path).stats()["stats_num_tokens"])
        rows.append(("baseline: stats arrays read with zarr alone", total, seconds))
        shards = min(v1_shards, len(store.shards))
        seconds, count = best_of(repeats, lambda: stats_from_targets(path, shards))
        rows.append((f"baseline: computed from targets, seq_len 4, k 2 ({shards} shards)", count, seconds))
        realistic = scratch / "realistic-v1"
        build_store(realistic, 128, 64, seq_len=2048, k=64, version=1, templates=2)
        seconds, count = best_of(repeats, lambda: stats_from_targets(realistic, 2))
        rows.append(("baseline: computed from targets, seq_len 2048, k 64 (version 1)", count, seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    inspect_rate = rows[0][1] / rows[0][2] * 60
    click.echo(f"\nmachine: {machine()} (load average at the end of the run)\n")
    click.echo(f"| what | samples | seconds (best of {repeats}) | samples / minute | inspect is x faster |")
    click.echo("|---|---:|---:|---:|---:|")
    for name, count, seconds in rows:
        rate = count / seconds * 60
        click.echo(f"| {name} | {count:,} | {seconds:.2f} | {rate:,.0f} | {inspect_rate / rate:.2f} |")
    click.echo(f"\ninspect: {report['samples']:,} samples, {report['shards']:,} shards; statistics read in "
               f"{report['stats_seconds']:.2f} s of the {rows[0][2]:.2f} s")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "machine": machine(), "samples_per_shard": samples_per_shard, "repeats": repeats,
            "rows": [{"what": name, "samples": count, "seconds": seconds, "samples_per_minute": count / seconds * 60}
                     for name, count, seconds in rows]}, indent=1))


if __name__ == "__main__":
    main()
