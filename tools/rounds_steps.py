"""The steps of a distillation round (`tools.rounds`) as command lines of `teacher-cache generate`, `teacher-cache
build` and `student-train`, each run in this process by invoking the sub-command's click command with its argument
list: the exact command a user would type, logged so that a step can be run by hand on another node.

A step's argument list joins the options the driver decides (model, data, output, seed, filters) and a YAML mapping
of the user's ({option: value}, turned into flags by `option_args`). `check_step` parses that list with the
sub-command's own click options and builds its config, so that every option the sub-command would refuse is refused
before any model loads. A step is done when its commit exists; an output that exists without it is continued with
--resume, or removed and started again when it holds nothing to resume from (a kill before the first shard, or
before the first checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

import student_train.cli as train_cli
import teacher_cache.cli as teacher_cli
from storage.dataset_options import TemplateOptions
from storage.fs import Location
from storage.generated import HEADER_NAME
from storage.generated import MANIFEST_NAME as GENERATION_NAME
from storage.layout import MANIFEST_NAME
from storage.manifest import Manifest
from storage.option_cli import load_options, make_config
from storage.options import check_values, field_default, flag_of, option_fields, spec_of
from student_train.checkpoint import latest_checkpoint
from student_train.config import TrainConfig
from student_train.config_file import READERS
from teacher_cache.config import BuildConfig
from teacher_cache.generate import GenerateConfig

log = logging.getLogger(__name__)

FINAL_METRICS = "final_metrics.json"  # written last by student-train, after the final student


class StepFailed(RuntimeError):
    """A sub-command refused its options or failed; the message names the step and its command line."""


@dataclass(frozen=True, kw_only=True)
class Program:
    """A sub-command the rounds run.

    Attributes:
        words: how a user types it, e.g. ("teacher-cache", "generate").
        command: its click command: the group, invoked with `words[1:]` before the options.
        config_class: the config its options make.
        driver_keys: the options the driver sets itself, which the user's mapping may not hold.
        done: whether an output holds the sub-command's commit.
        resumable: whether an output without it holds what --resume continues.
        readers: per option, how a config file's value becomes one the config takes (student-train's loss).
    """

    words: tuple[str, ...]
    command: click.Command
    config_class: type
    driver_keys: tuple[str, ...]
    done: Callable[[Path], bool]
    resumable: Callable[[Path], bool]
    readers: Mapping[str, Callable] | None = None

    def subcommand(self) -> click.Command:
        """The click command that parses the options (the group's command, or the group itself)."""
        return self.command.commands[self.words[1]] if len(self.words) > 1 else self.command


def _store_complete(output: Path) -> bool:
    return (output / MANIFEST_NAME).exists() and Manifest.load(Location(output)).complete


PROCESS_KEYS = ("resume", "num_workers", "worker_index")  # the driver resumes steps, and runs each in one process
GENERATE = Program(
    words=("teacher-cache", "generate"), command=teacher_cli.main, config_class=GenerateConfig,
    driver_keys=("model", "prompts", "output", "seed", "keep_truncated", "keep_duplicates", "keep_empty",
                 *PROCESS_KEYS),
    done=lambda output: (output / GENERATION_NAME).exists(), resumable=lambda output: (output / HEADER_NAME).exists())
BUILD = Program(
    words=("teacher-cache", "build"), command=teacher_cli.main, config_class=BuildConfig,
    driver_keys=("model", "dataset", "output", *PROCESS_KEYS), done=_store_complete,
    resumable=lambda output: (output / MANIFEST_NAME).exists())
TRAIN = Program(
    words=("student-train",), command=train_cli.main, config_class=TrainConfig,
    driver_keys=("store", "student", "output", "eval_store", "resume"), readers=READERS,
    done=lambda output: (output / FINAL_METRICS).exists(),
    resumable=lambda output: latest_checkpoint(output) is not None)


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a round: a sub-command with its argument list (--resume is added when it continues `output`)."""

    where: str
    name: str
    program: Program
    args: tuple[str, ...]
    output: Path

    @property
    def label(self) -> str:
        return f"{self.where}, {self.name}"

    def command_line(self, args: list[str] | tuple[str, ...] | None = None) -> str:
        return shlex.join([*self.program.words, *(self.args if args is None else args)])


def option_args(program: Program, options: Mapping, source: str) -> list[str]:
    """The command-line arguments of a YAML mapping of `program`'s options, each named as in its config files.

    True is the bare flag, False its --no- form (nothing where the option is off by default), null leaves the option
    out; a list repeats a repeatable option (--loss, --stop) and is joined by commas otherwise (--targets
    topk,sampled); a nested list, which no flag spells, becomes a KEY=VALUE argument.

    Raises:
        ValueError: an option the driver sets itself, an unknown one (with the closest names) or a value of the
            wrong type, naming `source`.
    """
    fields = {field.name: field for field in option_fields(program.config_class)}
    keys = {key: str(key).replace("-", "_") for key in options}
    if owned := [key for key, name in keys.items() if name in program.driver_keys]:
        raise ValueError(f"{source}: {', '.join(map(str, owned))} set by distill-rounds itself for each round "
                         f"({', '.join(program.driver_keys)}); remove them from {source}.")
    check_values(program.config_class, {name: options[key] for key, name in keys.items()}, source, program.readers)
    args: list[str] = []
    for key, name in keys.items():
        value = options[key]
        if program.readers and name in program.readers:
            value = program.readers[name](value)
        args += _flag_args(fields[name], value)
    return args


def _flag_args(field: dataclasses.Field, value) -> list[str]:
    flag = flag_of(field)
    if value is None or value is False and not field_default(field):
        return []
    if isinstance(value, bool):
        return [flag] if value else [f"--no-{flag[2:]}"]
    if not isinstance(value, list | tuple):
        return [flag, str(value)]
    if spec_of(field).multiple:
        return [part for item in value for part in (flag, str(item))]
    if any(isinstance(item, list | tuple | dict) for item in value):
        return [f"{field.name}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
    return [flag, ",".join(map(str, value))]


def check_step(step: Step) -> None:
    """Parse the step's arguments with its sub-command's click options and build its config (and read its chat
    template file), as the sub-command does before it loads a model.

    Raises:
        ValueError: what the sub-command would refuse, naming the step.
    """
    command = step.program.subcommand()
    try:
        ctx = command.make_context(" ".join(step.program.words), list(step.args))
        with ctx:
            config = make_config(step.program.config_class,
                                 *load_options(step.program.config_class, ctx.params, step.program.readers))
            if isinstance(config, TemplateOptions):
                config.read_template()
    except click.ClickException as exc:
        raise ValueError(f"{step.label}: {step.command_line()} would be refused: {exc.format_message()}") from None
    except ValueError as exc:
        raise ValueError(f"{step.label}: {exc}") from None


def run_step(step: Step) -> float | None:
    """Run `step` unless its output holds its commit: resumed when the output holds what --resume continues, from
    scratch otherwise.

    Returns:
        The step's wall time in seconds; None when it was done already.

    Raises:
        StepFailed: the sub-command's error message, with the step and its command line.
    """
    if step.program.done(step.output):
        log.info("%s: done (%s)", step.label, step.output)
        return None
    args = list(step.args)
    if step.output.exists():
        if step.program.resumable(step.output):
            args.append("--resume")
        else:
            log.info("%s: removing %s, which an interrupted run left with nothing to resume from", step.label,
                     step.output)
            shutil.rmtree(step.output)
    log.info("%s: %s", step.label, step.command_line(args))
    began = time.perf_counter()
    try:
        step.program.command.main(args=[*step.program.words[1:], *args], prog_name=step.program.words[0],
                                  standalone_mode=False)
    except click.ClickException as exc:
        raise StepFailed(f"{step.label} failed: {exc.format_message()}\nThe command was: {step.command_line(args)}\n"
                         "Fix the cause, then rerun distill-rounds with the same config: it continues from this "
                         "step.") from None
    return time.perf_counter() - began
