"""The `teacher-cache` commands on finished stores: info, inspect, select, merge, verify and export.

Each reads its options (`storage.option_cli`: flags, a --config file, KEY=VALUE) into a small frozen dataclass and
calls the library (`Store`, `inspect_store`, `select_samples`, `merge_workers`, `concat_stores`, `ensemble_stores`,
`drop_damaged_shards`, `export_parquet`). `teacher_cache.cli` adds them to the group beside `build`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import click

from storage.concat import concat_stores
from storage.ensemble import EnsembleConfig, ensemble_stores
from storage.export import export_parquet
from storage.fs import Location
from storage.inspection import KEYS, inspect_store, plot_report
from storage.inspection import format_report as format_inspection
from storage.layout import MANIFEST_NAME
from storage.manifest import isolates_documents
from storage.option_cli import click_options, load_config
from storage.options import option
from storage.reader import Store
from storage.repair import drop_damaged_shards
from storage.selection import ORDERS, SelectConfig, parse_band, select_samples
from storage.selection import summary as selection_summary
from storage.targets import describe_targets
from storage.workers import WorkerProgress, merge_workers, worker_progress

STORE = "The store."


def parse_weights(text: str) -> tuple[float, ...]:
    """'0.7,0.3' -> (0.7, 0.3), the weights of `merge --ensemble`."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--weights: expected numbers separated by commas, e.g. 0.7,0.3; got {text!r}.") from None


@dataclass(frozen=True, kw_only=True)
class InfoOptions:
    """Options of `teacher-cache info`."""

    store: str = option(help=STORE, argument=True)
    json: bool = option(False, help="Print machine-readable JSON.")


@dataclass(frozen=True, kw_only=True)
class InspectOptions:
    """Options of `teacher-cache inspect`."""

    store: str = option(help=STORE, argument=True)
    json: bool = option(False, help="Print every figure as JSON (every shard included).")
    plot: str | None = option(None, type=click.Path(dir_okay=False), help="Write the histograms to this PNG file.")
    shards: bool = option(False, help="List every shard on its own line (by default only up to 10; more are "
                                      "summarised).")


@dataclass(frozen=True, kw_only=True)
class SelectOptions:
    """The options of `SelectConfig` as `teacher-cache select` spells them."""

    store: str = option(help="The store to select from.", argument=True)
    key: str = option(flag="--by", choices=tuple(KEYS),
                      help="The per-sample statistic ranked: " + "; ".join(f"{k} = {d}" for k, (d, _) in KEYS.items())
                           + ".")
    top: float | None = option(None, help="Keep the highest this share of the candidates, e.g. 0.3.")
    bottom: float | None = option(None, help="Keep the lowest this share of the candidates.")
    band: tuple[float, float] | None = option(None, parse=parse_band, metavar="LOW:HIGH",
                                              help="Keep the candidates between two quantiles, e.g. 0.5:0.9.")
    order: str = option("shuffle", choices=ORDERS,
                        help="Training order of the ids: shuffle (--seed), ascending or descending by the key (a "
                             "curriculum; ascending entropy = most confident first), or store order.")
    seed: int = option(0, help="Seed of --order shuffle.")
    min_tokens: int = option(1, help="Candidates have at least this many trained tokens.")
    held_out_fraction: float = option(
        0.05, help="Never select the store's last samples, which student-train holds out with the same "
                   "--eval-fraction; 0: the whole store (then train with --eval-store).")
    output: str = option(type=click.Path(dir_okay=False), help="The selection file to write (JSON).")
    force: bool = option(False, help="Overwrite --output if it exists.")


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """Options of `teacher-cache merge`."""

    stores: tuple[str, ...] = option(help="The stores: one built by several workers, or finished ones to join.",
                                     argument=True)
    output: str | None = option(None, help="Join the finished STORES into this new store (absent or empty).")
    ensemble: bool = option(False, help="With --output: mix stores of different teachers over the same samples "
                                        "instead of concatenating.")
    weights: tuple[float, ...] | None = option(
        None, parse=parse_weights,
        help="--ensemble: a weight per store, comma-separated (e.g. 0.7,0.3), normalised to sum 1. Default: equal.")
    top_k: int | None = option(None, help="--ensemble: top-k ids kept per position. Default: the stores' largest k.")
    seed: int = option(0, help="--ensemble: seed of the draws subsampled when the weights or the stores' draw counts "
                               "differ.")
    resume: bool = option(False, help="With --output: finish an interrupted merge (same STORES and options).")


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    """Options of `teacher-cache verify`."""

    store: str = option(help=STORE, argument=True)
    repair: bool = option(False, help="Drop the damaged shards from the manifest (the store becomes incomplete), so "
                                      "that the build command that made the store, rerun with --resume, recomputes "
                                      "exactly those shards.")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Options of `teacher-cache export`."""

    store: str = option(help=STORE, argument=True)
    output: str = option(help="The file to write.", argument=True)
    format: str = option("parquet", choices=("parquet",), help="The file's format.")


def _open(store: str, **kwargs) -> Store:
    try:
        return Store(store, **kwargs)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click_options(InfoOptions)
def info(**params) -> None:
    """Samples, tokens, teacher, targets and bytes/token per array of STORE (worker progress before a merge)."""
    options = load_config(InfoOptions, params)
    location = Location(options.store)
    if not location.exists(MANIFEST_NAME) and (progress := worker_progress(location)):
        _workers_info(location, progress, options.json)
        return
    opened = _open(options.store, allow_incomplete=True)
    manifest = opened.manifest
    report = {
        "store": str(opened.location),
        "complete": manifest.complete,
        "format_version": manifest.format_version,
        "samples": manifest.num_samples,
        "positions": manifest.num_positions,
        "tokens": manifest.num_tokens,
        "trained_share": manifest.num_tokens / max(manifest.num_positions, 1),
        "shards": len(manifest.shards),
        "teacher": manifest.teacher,
        "dataset": manifest.dataset,
        "build": manifest.build,
        "targets": manifest.targets,
        "targets_summary": describe_targets(manifest.targets),
        "bytes_per_token": opened.bytes_per_token(),
    }
    if options.json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"store      {report['store']}  ({'complete' if manifest.complete else 'INCOMPLETE: resume the build'})")
    click.echo(f"samples    {report['samples']:,} in {report['shards']} shards; {report['tokens']:,} trained tokens "
               f"of {report['positions']:,} positions ({report['trained_share']:.1%})")
    t = manifest.teacher
    click.echo(f"teacher    {t['model']} ({t['architecture']}, vocab {t['vocab_size']}, {t['dtype']}, {t['backend']})")
    click.echo(f"dataset    {manifest.dataset['source']} [{manifest.dataset['split']}], seq_len "
               f"{manifest.build['seq_len']}, {_layout(manifest)}")
    click.echo(f"kinds      {report['targets_summary']}")
    click.echo("targets    " + "; ".join(f"{k} {v}" if v else k for k, v in manifest.targets.items()))
    click.echo("bytes/token")
    for name, value in report["bytes_per_token"].items():
        click.echo(f"  {name:<22}{value:10.2f}")


def _layout(manifest) -> str:
    """How the samples were made, e.g. "packed, documents isolated; messages, trained on assistant"."""
    build, dataset = manifest.build, manifest.dataset
    layout = "packed" if build["pack"] else "unpacked"
    if isolates_documents(build):
        layout += ", documents isolated"
    if "train_on" in dataset:
        layout += f"; {dataset['format']}, trained on {dataset['train_on']}"
    return layout


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


@click.command()
@click_options(InspectOptions)
def inspect(**params) -> None:
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
    options = load_config(InspectOptions, params)
    inspection = inspect_store(_open(options.store, allow_incomplete=True))
    if options.plot:
        plot_report(inspection, options.plot)
    if options.json:
        click.echo(json.dumps(inspection.report, indent=1))
        return
    click.echo(format_inspection(inspection.report, all_shards=options.shards))
    if options.plot:
        click.echo(f"\nHistograms written to {options.plot}.")


@click.command()
@click_options(SelectOptions)
def select(**params) -> None:
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
    options = load_config(SelectOptions, params)
    try:
        config = SelectConfig(**dataclasses.asdict(options))
        selection = select_samples(config, _open(config.store))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(selection_summary(selection, config.output))


@click.command()
@click_options(MergeOptions)
def merge(**params) -> None:
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
    options = load_config(MergeOptions, params)
    if options.output is None:
        _finish_workers(options)
        return
    if not options.ensemble and (options.weights is not None or options.top_k is not None):
        raise click.UsageError("--weights and --top-k choose how --ensemble mixes stores; add --ensemble, or drop them "
                               "to concatenate.")
    try:
        if options.ensemble:
            manifest = ensemble_stores(EnsembleConfig(inputs=options.stores, output=options.output,
                                                      weights=options.weights, top_k=options.top_k, seed=options.seed,
                                                      resume=options.resume))
        else:
            manifest = concat_stores(options.stores, options.output, resume=options.resume)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    count = len(options.stores)
    how = f"an ensemble of {count} teachers" if options.ensemble else f"{count} stores concatenated"
    click.echo(f"Wrote {manifest.num_samples} samples, {manifest.num_tokens} trained tokens in {len(manifest.shards)} "
               f"shards to {options.output} ({how}); targets: {', '.join(manifest.targets)}.")


def _finish_workers(options: MergeOptions) -> None:
    """`merge STORE`: the options that only joining stores takes are refused."""
    used = [name for name, value in (("--ensemble", options.ensemble), ("--weights", options.weights),
                                     ("--top-k", options.top_k), ("--seed", options.seed),
                                     ("--resume", options.resume)) if value]
    if used or len(options.stores) != 1:
        raise click.UsageError(
            (f"{', '.join(used)} need --output. " if used else f"{len(options.stores)} stores need --output. ")
            + "`teacher-cache merge STORE` finishes one store built by several workers; `teacher-cache merge A B "
            "... --output C` joins finished stores into a new one."
        )
    store = options.stores[0]
    try:
        manifest = merge_workers(Location(store))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{store} is complete: {manifest.num_samples} samples, {manifest.num_tokens} trained tokens in "
               f"{len(manifest.shards)} shards.")


@click.command()
@click_options(VerifyOptions)
def verify(**params) -> None:
    """Check all of STORE against its manifest: the manifest's digest, names and counts; every file's checksum
    (SHA-256); each array's shape against the store's options; each shard's trained tokens. Lists every problem
    (exit code 1).

    \b
    A damaged shard is rebuilt by the build that made the store:
      teacher-cache verify STORE --repair      # drops the damaged shards from the manifest
      teacher-cache build ... --resume          # the same command as before: recomputes exactly those
    """
    options = load_config(VerifyOptions, params)
    store = options.store
    if options.repair:
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


@click.command()
@click_options(ExportOptions)
def export(**params) -> None:
    """Write STORE's samples to OUTPUT (one Parquet file, a row group per shard)."""
    options = load_config(ExportOptions, params)
    rows = export_parquet(_open(options.store), options.output)
    click.echo(f"Wrote {rows} samples to {options.output}.")


COMMANDS = (info, inspect, select, merge, verify, export)
