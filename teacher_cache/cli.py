"""`teacher-cache`: build a store of teacher targets; generate data to build from; inspect, verify, export, select
from and merge stores.

The commands only parse options (declared once, as the fields of their config dataclass: `BuildConfig` and
`GenerateConfig` here, the others' in `teacher_cache.commands`) and call the library (`build_cache`,
`generate_responses`, `merge_workers`, `concat_stores`, `ensemble_stores`, `Store`, `export_parquet`,
`inspect_store`, `select_samples`).
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
from teacher_cache.generate import GenerateConfig, generate_responses
from teacher_cache.generate import summary as generation_summary
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
    config, sources = _worker_config(BuildConfig, params)
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


@main.command()
@click_options(GenerateConfig)
def generate(**params) -> None:
    """Have a model answer prompts, and write its answers as a dataset for `build`.

    \b
    Example (sequence-level KD: the teacher writes the replies, then scores them):
      teacher-cache generate --model /models/teacher --prompts prompts.jsonl --output /data/answers \\
          --num-responses 4 --temperature 0.8 --max-new-tokens 512
      teacher-cache build --model /models/teacher --dataset /data/answers --output /cache/answers

    Each prompt (a messages, prompt-completion or text row; text with --prompt-template becomes an instruction) is
    rendered with the model's chat template and answered --num-responses times. Every row keeps the conversation,
    the prompt id, the response index, the finish reason and the model's log-prob of each generated token; empty,
    truncated and repeated responses are dropped and counted. A response depends only on its prompt, its index and
    --seed, so --resume and several workers (--num-workers/--worker-index, or torchrun/SLURM) write what one
    uninterrupted run would. `build` over the output trains on the replies and records which model wrote them.
    """
    config, sources = _worker_config(GenerateConfig, params)
    try:
        manifest = generate_responses(config)
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
    if manifest is None:
        click.echo(f"Worker {config.worker_index} of {config.num_workers} wrote its shards to {config.output}; the "
                   "last worker to finish writes generation.json.")
        return
    click.echo(f"Wrote {generation_summary(manifest)} to {config.output}.")


def _worker_config(config_class: type, params: dict):
    """The config of a command run by one of several workers, and where each value came from: the workers and the
    device the options leave open come from torchrun's or SLURM's environment."""
    values, sources = load_options(config_class, params)
    try:
        values["num_workers"], values["worker_index"] = resolve_workers(
            *(values[name] if name in sources else None for name in ("num_workers", "worker_index")), os.environ)
        values["device"] = worker_device(values["device"], values["backend"], os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return make_config(config_class, values, sources), sources


for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
