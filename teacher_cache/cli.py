"""`teacher-cache`: build a store of teacher targets; inspect, verify, export, select from and merge stores.

The commands only parse options (declared once, as the fields of their config dataclass: `BuildConfig` here, the
others' in `teacher_cache.commands`) and call the library (`build_cache`, `merge_workers`, `concat_stores`,
`ensemble_stores`, `Store`, `export_parquet`, `inspect_store`, `select_samples`).
"""

from __future__ import annotations

import logging
import os
import sys

import click

from storage.integrity import StoreDamaged
from storage.lock import LockError
from storage.option_cli import click_options, load_options, make_config
from storage.options import with_sources
from storage.reader import Store
from teacher_cache.build import build_cache
from teacher_cache.commands import COMMANDS
from teacher_cache.config import BuildConfig, resolve_workers, worker_device
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
@click_options(BuildConfig)
def build(**params) -> None:
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
    values, sources = load_options(BuildConfig, params)
    try:  # the workers and the device the options leave open, from torchrun's or SLURM's environment
        values["num_workers"], values["worker_index"] = resolve_workers(
            *(values[name] if name in sources else None for name in ("num_workers", "worker_index")), os.environ)
        values["device"] = worker_device(values["device"], values["backend"], os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    config = make_config(BuildConfig, values, sources)
    try:
        manifest = build_cache(config)
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
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


for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
