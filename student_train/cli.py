"""`student-train`: train a student on a teacher-cache store; `student-train check` tests compatibility first;
`student-train eval` compares the trained student with its teacher.

The commands only parse options (declared once, as the fields of `TrainConfig`, `CheckOptions` and `EvalConfig`; see
`storage.options`), build the config and call one function.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click
from transformers import AutoConfig

from storage.fs import Location
from storage.identity import tokenizer_fingerprint
from storage.integrity import StoreDamaged
from storage.manifest import Manifest
from storage.option_cli import click_options, load_config, load_options, make_config
from storage.options import option, with_sources
from student_train.config import TrainConfig
from student_train.config_file import READERS
from student_train.cross_tokenizer import CrossTokenizer, default_cross_targets, teacher_tokenizer
from student_train.eval_report import markdown
from student_train.evaluate import EvalConfig, evaluate
from student_train.student import chat_template_problem, compatibility_problems, load_tokenizer


class _TrainGroup(click.Group):
    """The group of `student-train`: its own run (training) takes KEY=VALUE overrides where a group takes the name of
    a subcommand, and options before, among and after them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _, positional, _ = self.make_parser(ctx).parse_args(args=list(args))
        if not positional or "=" not in positional[0]:  # a subcommand (check, eval), or no argument at all
            return super().parse_args(ctx, args)
        ctx.allow_interspersed_args = ctx.allow_extra_args = True
        return click.Command.parse_args(self, ctx, args)  # the overrides are left in ctx.args

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreDamaged as exc:  # from any command that reads a store: a message, not a traceback
            raise click.ClickException(str(exc)) from None


@click.group(cls=_TrainGroup, invoke_without_command=True, subcommand_metavar="[KEY=VALUE]... | COMMAND [ARGS]...",
             context_settings={"help_option_names": ["-h", "--help"]})
@click_options(TrainConfig, positional=False)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, **params) -> None:
    """Train a student LLM on the targets cached by `teacher-cache build`; the teacher stays out of memory (unless
    --online-teacher runs it, the baseline).

    \b
    Example:
      student-train --store /cache/run1 --student ./student-config.json --output runs/kd --max-steps 2000
      student-train ... --loss forward_kl=0.7 --loss ce=0.3 --targets-from topk_tail

    \b
    Config files:
      student-train --config examples/kd-topk-tail.yaml store=/cache/run1 output=runs/kd lr=3e-4 --max-steps 2000
    --config reads a YAML file of options, named as the options below with _ for - (max_steps: 2000). KEY=VALUE
    arguments, their values read as YAML (loss=[jsd=0.9,ce=0.1], eval_store= for none), override the file, and
    options given on the command line override both. Unknown names and values of the wrong type are refused. The
    resolved options are saved as OUTPUT/resolved_config.yaml, which --config reads again (add --resume to continue
    the run: a resumed run may change only its length and how it runs, not what it learns); --print-config prints
    them without training.

    \b
    Loss: s(step) * T^2 * sum of WEIGHT * divergence(teacher p, student q) + WEIGHT * ce, each a mean over tokens
      forward_kl  KL(p || q)                          mean-seeking; unbiased gradient with sampled, hybrid
      reverse_kl  KL(q || p)                          mode-seeking; not with sampled, hybrid, topk_residual
      jsd         b KL(p || m) + (1-b) KL(q || m)     m = b p + (1-b) q, b = --jsd-beta
      tv          sum |p - q| / 2                     total variation, in [0, 1]
      skew_kl     KL(p || a p + (1-a) q)              DistiLLM's skew KL, a = --skew-alpha
      skew_rkl    KL(q || a q + (1-a) p)              skew reverse KL
      ce          -log q(true next token)             never tempered nor scheduled
      rollout_rkl w (log q(x) - log p(x)), x sampled  on-policy KL(q || p) on a store of the student's own rollouts;
                  by the student, w = min(q/mu, C)    mu its sampling distribution, C = --rollout-clip; T = 1 only
    p and q are compared over the buckets of --targets-from: topk_tail = the k stored ids + one bucket for the
    rest of the vocabulary; topk_renorm = the k ids, both renormalised; topk_residual = the k ids + the tail mass
    on the true next token + one bucket for the student's mass elsewhere; sampled = the teacher's draws (counts / N)
    + one bucket for the student's mass elsewhere, temperature 1 only; hybrid (stores built with --targets hybrid)
    = the k ids exact + draws from the tail (tail mass * counts / N) + one bucket for the rest, temperature 1 only;
    --top-k K narrows topk_* to the K most probable stored ids. online (--online-teacher DIR) = the teacher's full
    distribution, computed during training from its hidden states a chunk at a time: every divergence and T exact,
    the store's targets unread.
    s(step) is --kd-schedule.
    --feature-loss adds --feature-weight * (mse or 1 - cos) between student and stored teacher hidden states.
    """
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only rank 0 logs and reports
    level = (logging.DEBUG if verbose else logging.INFO) if main_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand is not None:
        return
    values, sources = load_options(TrainConfig, params, READERS)
    student = values["student"] or values["init_from_teacher"]
    given = {"--store": values["store"], "--student (or --init-from-teacher)": student, "--output": values["output"]}
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see student-train --help).")
    config = make_config(TrainConfig, values, sources)
    from student_train.train import train

    try:
        evaluation = train(config)
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if main_rank:
        click.echo(f"Student saved to {config.output}; held-out: {json.dumps(evaluation)}")


@dataclass(frozen=True, kw_only=True)
class CheckOptions:
    """Options of `student-train check`."""

    store: str = option(help="Store written by `teacher-cache build`.")
    student: str = option(help="Student model or config directory (with tokenizer).")
    teacher_tokenizer: str | None = option(
        None, metavar="DIR",
        help="Where the store's teacher tokenizer is, to check a student with another tokenizer (default: the teacher "
             "directory the manifest names).")


@main.command()
@click_options(CheckOptions)
def check(**params) -> None:
    """Check that STUDENT shares the store's tokenizer and vocabulary, or that its own tokenizer aligns with the
    store's by characters (a cross-tokenizer student)."""
    options = load_config(CheckOptions, params)
    store, student = options.store, options.student
    try:
        manifest = Manifest.load(Location(store))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    path = Path(student)
    if not path.exists():
        raise click.ClickException(f"--student {student}: no such file or directory.")
    tokenizer = load_tokenizer(path.parent if path.is_file() else path, manifest)
    vocab_size = AutoConfig.from_pretrained(student).vocab_size
    if tokenizer_fingerprint(tokenizer) != manifest.teacher["tokenizer_sha256"]:
        _check_cross(options, manifest, tokenizer, vocab_size)
        return
    problems = compatibility_problems(tokenizer, vocab_size, manifest, student)
    problems += [problem for problem in [chat_template_problem(tokenizer, manifest, student)] if problem]
    if problems:
        raise click.ClickException("\n".join(problems))
    click.echo(f"{student} can train on {store}: same tokenizer"
               + (", same chat template" if "chat_template_sha256" in manifest.dataset else "")
               + f", vocabulary {manifest.teacher['vocab_size']}.")


def _check_cross(options: CheckOptions, manifest: Manifest, tokenizer, vocab_size: int) -> None:
    """A student with another tokenizer: whether it aligns with the store's by characters, with what it maps."""
    try:
        cross = CrossTokenizer(teacher_tokenizer(options.teacher_tokenizer, manifest), tokenizer,
                               manifest.teacher["vocab_size"])
    except ValueError as exc:
        mismatch = compatibility_problems(tokenizer, vocab_size, manifest, options.student)
        raise click.ClickException(f"{' '.join(mismatch)} Training through the character alignment is not possible "
                                   f"either: {exc}") from None
    if vocab_size < len(tokenizer):
        raise click.ClickException(f"vocab size mismatch: the student {options.student} predicts {vocab_size} ids and "
                                   f"its tokenizer has {len(tokenizer)} tokens; resize its embeddings.")
    click.echo(f"{options.student} can train on {options.store} through the character alignment: its tokenizer "
               f"({len(tokenizer)} tokens) is not the store's ({manifest.teacher['tokenizer_vocab_size']}); "
               f"{cross.mapped_share:.0%} of the teacher's ids have a student token of the same bytes (--targets-from "
               f"{default_cross_targets(manifest.targets)} by default; see README, A student with another tokenizer).")


@main.command("eval")
@click_options(EvalConfig)
def eval_(**params) -> None:
    """Compare the teacher and the student on held-out text: LM loss, perplexity, KL(teacher || student), top-1
    agreement, calibration error, parameters, size on disk, speed and peak memory.

    \b
    Example:
      student-train eval --teacher /models/teacher --student runs/kd --store /cache/run1
    """
    config = load_config(EvalConfig, params)
    try:
        report = evaluate(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown(report))
    click.echo(f"Report written to {config.output or Path(config.student) / 'eval'} (report.json, report.md, "
               "report.png).")


if __name__ == "__main__":  # torchrun ... -m student_train.cli
    main()
