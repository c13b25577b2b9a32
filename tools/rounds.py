"""`distill-rounds`: on-policy distillation in rounds. The student answers prompts, the teacher scores its answers,
the student trains on the teacher's targets; the next round's student is the one just trained. The teacher and the
student are never in memory together: each step is one of the two phases' commands (`tools.rounds_steps`).

Round r (0-based), every artefact under RUN/round-{r}/:

    rollouts/      teacher-cache generate --model STUDENT_r --prompts PROMPTS --seed SEED+r --keep-truncated
                   --keep-duplicates --keep-empty (on-policy samples are never filtered: a dropped reply biases
                   the estimate)
    store/         teacher-cache build --model TEACHER --dataset rollouts
    train/         student-train --store store --student STUDENT_r [--eval-store EVAL_STORE]
    eval/          with heldout_prompts: the trained student's answers to them (eval/rollouts, --seed EVAL_SEED every
                   round) and the teacher's targets on them (eval/store), whose true-token log-probs are its
                   log-likelihood of the student's own samples
    summary.json   written last, the round's commit (`tools.rounds_report`)

STUDENT_0 is the config's student, STUDENT_r round r-1's train/. RUN/initial/ evaluates STUDENT_0 the same way once,
as the baseline. RUN/summary.json and summary.md hold the table of all rounds, which the command prints.

Every step is done when its commit exists, and continued with --resume when its output holds a part of it, so the
command, rerun with the same config, goes on where it stopped. The config is saved as RUN/rounds_config.json; a rerun
may change only `rounds` (more rounds extend a finished run).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from storage.fs import Location
from storage.lock import OutputLock
from storage.option_cli import click_options, load_options, make_config
from storage.options import config_values, option, with_sources
from storage.samples import read_dataset
from student_train.run_dir import check_writable
from tools.rounds_report import format_table, held_out_metrics, rollout_stats, teacher_loglik, trained_tokens
from tools.rounds_steps import BUILD, GENERATE, TRAIN, Step, check_step, option_args, run_step

log = logging.getLogger(__name__)

ROUND_PROMPTS = "prompts.jsonl"  # a round's share of the prompts, with prompts_per_round
CONFIG_NAME = "rounds_config.json"  # the saved config, which a rerun must match
SUMMARY_NAME = "summary.json"  # of a round (its commit), of the initial evaluation, and of the run
TIMINGS_NAME = "timings.json"  # per round: the wall seconds of each step, written as each one finishes
LENGTH_KEYS = ("rounds", "output")  # what a rerun may change: how long it goes on (and where the run now lies)
PATH_KEYS = ("teacher", "student", "prompts", "output", "heldout_prompts", "eval_store")
ON_POLICY = ("--keep-truncated", "--keep-duplicates", "--keep-empty", "--num-workers", "1")
ONE_PROCESS = ("--num-workers", "1")


def parse_mapping(text: str) -> dict:
    """A command-line mapping of options, e.g. '{num_responses: 4, temperature: 0.8}'."""
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a YAML mapping of options to values, e.g. '{{top_k: 64}}'; got {text!r}.")
    return value


def _mapping(help: str):
    return option(default_factory=dict, parse=parse_mapping, metavar="MAPPING", show_default=False, help=help)


@dataclass(kw_only=True)
class RoundsConfig:
    """Options of `distill-rounds`, usually a YAML file (--config rounds.yaml) with KEY=VALUE overrides."""

    teacher: str = option(help="The teacher: a local Hugging Face model directory (tokenizer with a chat template). It "
                               "scores the student's answers, never beside the student.")
    student: str = option(help="The initial student: a model directory with weights, the teacher's tokenizer and chat "
                               "template. It answers round 0's prompts.")
    prompts: str = option(help="The prompts the student answers (`teacher-cache generate --prompts`): all of them "
                               "every round, or prompts_per_round of them.")
    output: str = option(help="The run directory: RUN/round-R/ for each round, RUN/initial/, RUN/summary.json.")
    rounds: int = option(1, help="Rounds to run. A rerun with more continues a finished run.")
    prompts_per_round: int | None = option(
        None, help="Round r answers N of the prompts: rows r*N to (r+1)*N - 1, wrapping around (written to "
                   "RUN/round-r/prompts.jsonl). Default: every prompt, every round (round r draws with seed SEED + r).")
    heldout_prompts: str | None = option(
        None, help="Held-out prompts: before the first round and after each, the student answers them and the "
                   "teacher's mean log-prob of its answers is reported.")
    eval_store: str | None = option(None, help="A store for `student-train --eval-store`. Default: student-train "
                                               "holds out the --eval-fraction of each round's store.")
    seed: int = option(0, help="Round r's answers are drawn with seed SEED + r.")
    eval_seed: int = option(0, help="Seed of the answers to the held-out prompts, the same every round.")
    generate: dict = _mapping("Options of `teacher-cache generate`, as in its config files, e.g. {num_responses: 4, "
                              "max_new_tokens: 512}. True is a bare flag, a list repeats a repeatable flag.")
    build: dict = _mapping("Options of `teacher-cache build` (also for the held-out answers), e.g. {top_k: 64}.")
    train: dict = _mapping("Options of `student-train`, e.g. {loss: {rollout_rkl: 1}, max_steps: 50, lr: 1e-4}.")
    eval_generate: dict = _mapping("Options of the held-out `teacher-cache generate`, over those of generate (a key "
                                   "here replaces the same key there; null leaves it out).")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds: must be at least 1, got {self.rounds}.")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(f"prompts_per_round: must be at least 1, got {self.prompts_per_round}; leave it out to "
                             "answer every prompt every round.")
        if self.eval_generate and self.heldout_prompts is None:
            raise ValueError("eval_generate: options of the answers to heldout_prompts, which is not given; add "
                             "heldout_prompts, or remove eval_generate.")


def run_rounds(config: RoundsConfig) -> list[dict]:
    """Run (or continue) the rounds of `config`; returns the summaries: the initial evaluation's (with held-out
    prompts), then each round's.

    Raises:
        ValueError: a missing path, an option a sub-command would refuse, or a config other than the run's saved one;
            all found before any model loads.
        StepFailed: a step's command failed (its message, and the command line).
        LockError: another `distill-rounds` runs in the same directory.
    """
    config = dataclasses.replace(config, **{key: os.path.abspath(os.path.expanduser(getattr(config, key)))
                                            for key in PATH_KEYS if getattr(config, key) is not None})
    run = Path(config.output)
    check_writable(run)
    _check_paths(config)
    for step in [*_evaluation_steps(config, "initial student", run / "initial", config.student),
                 *_round_steps(config, 0)]:
        check_step(step)
    location = Location(run)
    with OutputLock(location):
        _check_saved_config(config, run)
        location.write_bytes_atomic(CONFIG_NAME, json.dumps(config_values(config), indent=1).encode())
        summaries = [_initial(config)] if config.heldout_prompts is not None else []
        for r in range(config.rounds):
            cumulative = summaries[-1]["teacher_tokens"]["cumulative"] if summaries else 0
            summaries.append(_round(config, r, cumulative))
        location.write_bytes_atomic(SUMMARY_NAME, json.dumps({"rounds": summaries}, indent=1).encode())
        location.write_bytes_atomic("summary.md", format_table(summaries).encode())
    return summaries


def _check_paths(config: RoundsConfig) -> None:
    for key in ("teacher", "student"):
        if not Path(getattr(config, key)).is_dir():
            raise ValueError(f"{key} {getattr(config, key)}: no such directory; give a local Hugging Face model "
                             "directory (weights, tokenizer with a chat template).")
    for key in ("prompts", "heldout_prompts", "eval_store"):
        if getattr(config, key) is not None and not Path(getattr(config, key)).exists():
            raise ValueError(f"{key} {getattr(config, key)}: no such file or directory.")


def _check_saved_config(config: RoundsConfig, run: Path) -> None:
    """Refuse to continue a run with another config than its own, but for `rounds`, which may not drop below the
    rounds already begun."""
    path = run / CONFIG_NAME
    if path.exists():
        saved, now = json.loads(path.read_text()), json.loads(json.dumps(config_values(config)))
        changed = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now
                   if key not in LENGTH_KEYS and saved.get(key) != now[key]]
        if changed:
            raise ValueError(f"{run} was started with another config; changed: {'; '.join(changed)}. Continue it with "
                             f"its own (saved in {path}; only rounds may change), or choose a new output.")
    numbers = [path.name.removeprefix("round-") for path in run.glob("round-*")]
    begun = [int(number) for number in numbers if number.isdigit()]
    if begun and max(begun) >= config.rounds:
        raise ValueError(f"rounds {config.rounds}: {run} holds round {max(begun)} already (rounds count from 0); pass "
                         f"rounds {max(begun) + 1} or more.")


def _round_steps(config: RoundsConfig, r: int) -> list[Step]:
    """The steps of round r: generate, build, train, then the held-out evaluation of the trained student."""
    root = Path(config.output) / f"round-{r}"
    student = config.student if r == 0 else str(Path(config.output) / f"round-{r - 1}" / "train")
    prompts = config.prompts if config.prompts_per_round is None else str(root / ROUND_PROMPTS)
    rollouts, store, train = root / "rollouts", root / "store", root / "train"
    where = f"round {r}"
    eval_store = ("--eval-store", config.eval_store) if config.eval_store else ()
    return [
        Step(where=where, name="generate", program=GENERATE, output=rollouts, args=(
            "--model", student, "--prompts", prompts, "--output", str(rollouts), "--seed", str(config.seed + r),
            *ON_POLICY, *option_args(GENERATE, config.generate, "generate"))),
        Step(where=where, name="build", program=BUILD, output=store, args=(
            "--model", config.teacher, "--dataset", str(rollouts), "--output", str(store), *ONE_PROCESS,
            *option_args(BUILD, config.build, "build"))),
        Step(where=where, name="train", program=TRAIN, output=train, args=(
            "--store", str(store), "--student", student, "--output", str(train), *eval_store,
            *option_args(TRAIN, config.train, "train"))),
        *_evaluation_steps(config, where, root, str(train)),
    ]


def _evaluation_steps(config: RoundsConfig, where: str, root: Path, student: str) -> list[Step]:
    """The student's answers to the held-out prompts and the teacher's targets on them (none without them)."""
    if config.heldout_prompts is None:
        return []
    rollouts, store = root / "eval" / "rollouts", root / "eval" / "store"
    options = {key: value for key, value in {**config.generate, **config.eval_generate}.items() if value is not None}
    return [
        Step(where=where, name="eval_generate", program=GENERATE, output=rollouts, args=(
            "--model", student, "--prompts", config.heldout_prompts, "--output", str(rollouts), "--seed",
            str(config.eval_seed), *ON_POLICY, *option_args(GENERATE, options, "eval_generate over generate"))),
        Step(where=where, name="eval_build", program=BUILD, output=store, args=(
            "--model", config.teacher, "--dataset", str(rollouts), "--output", str(store), *ONE_PROCESS,
            *option_args(BUILD, config.build, "build"))),
    ]


def _initial(config: RoundsConfig) -> dict:
    """The initial student's held-out evaluation: RUN/initial/summary.json, written after its steps."""
    root = Path(config.output) / "initial"
    if (root / SUMMARY_NAME).exists():
        return json.loads((root / SUMMARY_NAME).read_text())
    seconds = _run_steps(_evaluation_steps(config, "initial student", root, config.student), root)
    loglik = teacher_loglik(root / "eval" / "store", root / "eval" / "rollouts")
    tokens = trained_tokens(root / "eval" / "store")
    return _commit(root, {"round": "initial", "student": config.student,
                          "teacher_tokens": {"train_store": 0, "eval_store": tokens, "round": tokens,
                                             "cumulative": tokens},
                          "teacher_loglik": loglik, "seconds": seconds})


def _round(config: RoundsConfig, r: int, cumulative: int) -> dict:
    """Run round r's steps and write its summary; a round with a summary is done, and its summary is returned."""
    root = Path(config.output) / f"round-{r}"
    if (root / SUMMARY_NAME).exists():
        return json.loads((root / SUMMARY_NAME).read_text())
    if config.prompts_per_round is not None and not (root / ROUND_PROMPTS).exists():
        _write_round_prompts(config, r, root / ROUND_PROMPTS)
    seconds = _run_steps(_round_steps(config, r), root)
    scored = {"train_store": trained_tokens(root / "store"), "eval_store": 0}
    loglik = None
    if config.heldout_prompts is not None:
        scored["eval_store"] = trained_tokens(root / "eval" / "store")
        loglik = teacher_loglik(root / "eval" / "store", root / "eval" / "rollouts")
    scored["round"] = scored["train_store"] + scored["eval_store"]
    scored["cumulative"] = cumulative + scored["round"]
    return _commit(root, {"round": r, "student": config.student if r == 0 else f"round-{r - 1}/train",
                          "rollouts": rollout_stats(root / "rollouts"), "teacher_tokens": scored,
                          "held_out": held_out_metrics(root / "train"), "teacher_loglik": loglik,
                          "seconds": seconds})


def _write_round_prompts(config: RoundsConfig, r: int, path: Path) -> None:
    """Round r's share of the prompts (`prompts_per_round`), as JSON lines with the source's columns."""
    dataset = read_dataset(config.prompts, config.generate.get("split", "train"))
    count = config.prompts_per_round
    rows = dataset.select([(r * count + i) % len(dataset) for i in range(count)])
    buffer = io.BytesIO()
    rows.to_json(buffer, lines=True, force_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    Location(path.parent).write_bytes_atomic(path.name, buffer.getvalue())


def _run_steps(steps: list[Step], root: Path) -> dict[str, float | None]:
    """Run the steps not done yet, in order; the wall seconds of each, as recorded when it finished (None: not
    recorded, the run was stopped between the step's commit and the record)."""
    path = root / TIMINGS_NAME
    seconds = json.loads(path.read_text()) if path.exists() else {}
    for step in steps:
        took = run_step(step)
        if took is not None:
            seconds[step.name] = took
            Location(root).write_bytes_atomic(TIMINGS_NAME, json.dumps(seconds, indent=1).encode())
    return {step.name: seconds.get(step.name) for step in steps}


def _commit(root: Path, summary: dict) -> dict:
    """Write a summary (the commit of a round, or of the initial evaluation) with its total seconds."""
    summary["seconds_total"] = sum(value for value in summary["seconds"].values() if value is not None)
    Location(root).write_bytes_atomic(SUMMARY_NAME, json.dumps(summary, indent=1).encode())
    log.info("%s: done in %.0fs; summary in %s", root.name, summary["seconds_total"], root / SUMMARY_NAME)
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click_options(RoundsConfig)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool, **params) -> None:
    """On-policy distillation in rounds: the student answers the prompts (`teacher-cache generate`), the teacher
    scores its answers (`teacher-cache build`), the student trains on them (`student-train`); the next round starts
    from the student just trained.

    \b
    Example:
      distill-rounds --config rounds.yaml rounds=3

    \b
    rounds.yaml:
      teacher: /models/teacher
      student: /models/student
      prompts: prompts.jsonl
      prompts_per_round: 512
      heldout_prompts: heldout.jsonl
      output: runs/onpolicy
      rounds: 3
      generate: {num_responses: 4, max_new_tokens: 256, temperature: 1.0}
      build: {top_k: 64, seq_len: 1024}
      train: {loss: {rollout_rkl: 1}, max_steps: 50, lr: 1e-4}

    Every step's command line is logged (run it by hand to move a step to another node). Rerun the same command to
    continue an interrupted run where it stopped; a rerun may change only rounds.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    values, sources = load_options(RoundsConfig, params)
    config = make_config(RoundsConfig, values, sources)
    try:
        summaries = run_rounds(config)
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
    except RuntimeError as exc:  # a step that failed, a locked run directory
        raise click.ClickException(str(exc)) from None
    click.echo(format_table(summaries), nl=False)


if __name__ == "__main__":
    main()
