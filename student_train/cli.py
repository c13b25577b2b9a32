"""`student-train`: train a student on a teacher-cache store; `student-train check` tests compatibility first;
`student-train eval` compares the trained student with its teacher.

The commands only parse options, build a config (`TrainConfig`, `EvalConfig`) and call one function.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click
from transformers import AutoConfig

from storage.fs import Location
from storage.integrity import StoreDamaged
from storage.manifest import Manifest
from student_train.config import DEFAULT_ALPHA, DISTRIBUTED, PRECISIONS, TrainConfig
from student_train.config_file import resolve_options, with_sources
from student_train.divergences import REPRESENTATIONS, TARGETS_FROM
from student_train.features import FEATURE_LOSSES, PROJECTIONS
from student_train.liger import FUSED_CE
from student_train.loss_config import LOSS_IMPLS, LOSS_NAMES, SCHEDULES
from student_train.student import compatibility_problems, load_tokenizer

TRAIN_OPTIONS = [
    click.option("--store", help="Store written by `teacher-cache build`."),
    click.option("--student", help="Student: a local HF model directory (weights are the init) or an HF config "
                                   "(config.json, or a directory with only one) for a random init."),
    click.option("--output", help="Run directory: checkpoints, metrics.jsonl and the final student."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                 help="A YAML file of options, named as here with _ for - (max_steps: 2000, loss: [jsd=0.9, ce=0.1]); "
                      "see examples/. KEY=VALUE arguments override it, and options given here override both."),
    click.option("--loss", multiple=True, metavar="NAME=WEIGHT",
                 help=f"A loss term, repeatable; NAME is one of {', '.join(LOSS_NAMES)} (the menu above). "
                      f"Default: forward_kl=ALPHA ce=1-ALPHA. A bare {'/'.join(REPRESENTATIONS)} is --targets-from."),
    click.option("--targets-from", type=click.Choice(list(TARGETS_FROM)),
                 help="What the divergences compare with. Default: hybrid (exact top-k plus draws from the tail) "
                      "when the store's draws are of the teacher's tail, else topk_tail (top-k plus a tail bucket) "
                      "when the store has top-k targets, else sampled. topk_residual gives the tail mass to the true "
                      "next token (a biased baseline); topk_renorm is biased, offered for comparison. online: the "
                      "full distribution of --online-teacher (implied by it)."),
    click.option("--top-k", type=int, metavar="K",
                 help="With topk_tail, topk_renorm or topk_residual: use only the K most probable of the store's "
                      "top-k ids (the others' mass joins the tail), e.g. top-8 from a top-64 store. Not with hybrid. "
                      "Default: all of them."),
    click.option("--online-teacher", metavar="DIR",
                 help="Online full-logit KD, the baseline for cached targets: run this teacher (a local HF model with "
                      "the store's tokenizer and vocabulary) beside the student, frozen (bf16 under bf16 autocast), "
                      "and compare with its full distribution, a chunk of positions at a time, instead of the "
                      "store's targets. The store still gives the token ids; held-out KL still uses its targets. The "
                      "teacher is not saved; --resume loads it again."),
    click.option("--alpha", type=float,
                 help=f"KD weight of the default loss when --loss gives no weights (default {DEFAULT_ALPHA}): "
                      "forward_kl=ALPHA ce=1-ALPHA; 0 trains with CE only."),
    click.option("--temperature", type=float, default=1.0, show_default=True,
                 help="Softening of both distributions in the divergences, with the T^2 factor (must be 1 for "
                      "sampled and hybrid targets)."),
    click.option("--jsd-beta", type=float, default=0.5, show_default=True,
                 help="jsd's beta in (0, 1): the teacher's share of the mixture."),
    click.option("--skew-alpha", type=float, default=0.1, show_default=True,
                 help="skew_kl's and skew_rkl's alpha in (0, 1)."),
    click.option("--kd-schedule", default="constant", show_default=True, metavar="SCHEDULE",
                 help=f"Factor on the divergences by step: {', '.join(SCHEDULES)} (0 -> 1 over STEPS; 1 -> 0 over "
                      "STEPS). CE is not scheduled."),
    click.option("--feature-loss", type=click.Choice(list(FEATURE_LOSSES)),
                 help="Also pull the student's hidden states towards the teacher's stored by `teacher-cache build "
                      "--hidden-layers`: mse or cosine (1 - cos). Default: off."),
    click.option("--feature-weight", type=float, default=1.0, show_default=True,
                 help="Weight of --feature-loss in the total (not scheduled)."),
    click.option("--feature-layers", metavar="S:T,...",
                 help="Student hidden-state index : teacher index as stored (0 = embeddings, -1 = last), e.g. 2:4,4:8. "
                      "Default: each stored teacher layer with the student layer at the same relative depth."),
    click.option("--feature-projection", type=click.Choice(list(PROJECTIONS)), default="auto", show_default=True,
                 help="A learned linear map from each student layer to the teacher's width: auto = when the widths "
                      "differ. It trains with the student and is kept in checkpoints, not in the saved student."),
    click.option("--batch-size", type=int, default=8, show_default=True,
                 help="Samples per micro-batch (per process under torchrun)."),
    click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW)."),
    click.option("--weight-decay", type=float, default=0.1, show_default=True),
    click.option("--warmup-steps", type=int, help="Linear warmup steps. Default: 10% of the run, at most 100."),
    click.option("--max-steps", type=int, help="Optimizer steps. Default: --epochs passes over the data."),
    click.option("--epochs", type=float, default=1.0, show_default=True),
    click.option("--clip-grad", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: off)."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                 help="auto = bf16 autocast on CUDA, fp32 on CPU."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
    click.option("--eval-fraction", type=float, default=0.05, show_default=True,
                 help="Share of the store (its last samples) held out for evaluation."),
    click.option("--eval-store", help="A separate store to evaluate on (instead of --eval-fraction)."),
    click.option("--eval-every", type=int, default=200, show_default=True, help="Evaluate every N steps."),
    click.option("--save-every", type=int, default=500, show_default=True, help="Checkpoint every N steps."),
    click.option("--log-every", type=int, default=10, show_default=True, help="Write metrics every N steps."),
    click.option("--chunk-positions", type=int, default=256, show_default=True,
                 help="Positions whose student logits exist at once in the loss (memory vs speed)."),
    click.option("--fused-ce", type=click.Choice(list(FUSED_CE)), default="auto", show_default=True,
                 help="A loss of CE alone on CUDA: auto = Liger-kernel's fused linear cross-entropy when installed "
                      "(pip install liger-kernel), else the torch path; liger = require it; torch = never. Same "
                      "loss and gradients either way."),
    click.option("--loss-impl", type=click.Choice(list(LOSS_IMPLS)), default="fused", show_default=True,
                 help="How the loss applies the head, a chunk of positions at a time: fused = each chunk's logits "
                      "computed once, their gradient built in the forward pass from a few values per position "
                      "(log-normaliser, logits at the target ids) and kept until backward as the gradients of the "
                      "hidden states and head; checkpoint = activation checkpointing, the logits computed again in "
                      "backward (slower; the reference). Same loss and gradients. Online KD always uses checkpoint."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--num-workers", type=int, default=0, show_default=True, help="Loader worker processes."),
    click.option("--verify/--no-verify", default=True, show_default=True,
                 help="Check every store file against its SHA-256 in the manifest before its first read (a damaged "
                      "store is an error, not wrong targets). --no-verify skips the hashing; files are still checked "
                      "for presence and size."),
    click.option("--distributed", type=click.Choice(list(DISTRIBUTED)), default="ddp", show_default=True,
                 help="Under torchrun: ddp (each GPU holds the whole student) or fsdp (FSDP2: parameters, gradients "
                      "and optimizer states sharded over the GPUs)."),
    click.option("--selection", help="Train on exactly the sample ids of this JSON file, in its order."),
    click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output."),
    click.option("--init-from-teacher", help="Instead of --student: a local HF teacher directory (same tokenizer as "
                                             "the store) whose layers --keep-layers, with its embeddings, final norm "
                                             "and head, are the student (the DistilBERT recipe)."),
    click.option("--keep-layers", metavar="I,J,...",
                 help="The teacher's layers kept by --init-from-teacher, e.g. 0,2,4 or 0,-1 (negative: from the "
                      "end). Default: every other layer from 0."),
]


def _train_options(function):
    for option in reversed(TRAIN_OPTIONS):
        function = option(function)
    return function


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
@_train_options
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, **options) -> None:
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
    the run: a resumed run may change only its length and how it runs, not what it learns).

    \b
    Loss: s(step) * T^2 * sum of WEIGHT * divergence(teacher p, student q) + WEIGHT * ce, each a mean over tokens
      forward_kl  KL(p || q)                          mean-seeking; unbiased gradient with sampled, hybrid
      reverse_kl  KL(q || p)                          mode-seeking; not with sampled, hybrid, topk_residual
      jsd         b KL(p || m) + (1-b) KL(q || m)     m = b p + (1-b) q, b = --jsd-beta
      tv          sum |p - q| / 2                     total variation, in [0, 1]
      skew_kl     KL(p || a p + (1-a) q)              DistiLLM's skew KL, a = --skew-alpha
      skew_rkl    KL(q || a q + (1-a) p)              skew reverse KL
      ce          -log q(true next token)             never tempered nor scheduled
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
    command_line = {name: value for name, value in options.items()
                    if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
    try:
        options, sources = resolve_options(command_line.pop("config_file", None), ctx.args, command_line)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    student = options["student"] or options["init_from_teacher"]
    given = {"--store": options["store"], "--student (or --init-from-teacher)": student, "--output": options["output"]}
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see student-train --help).")
    from student_train.train import train

    try:
        evaluation = train(TrainConfig(**options))
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if main_rank:
        click.echo(f"Student saved to {options['output']}; held-out: {json.dumps(evaluation)}")


@main.command()
@click.option("--store", required=True, help="Store written by `teacher-cache build`.")
@click.option("--student", required=True, help="Student model or config directory (with tokenizer).")
def check(store: str, student: str) -> None:
    """Check that STUDENT shares the store's tokenizer and vocabulary."""
    try:
        manifest = Manifest.load(Location(store))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    path = Path(student)
    if not path.exists():
        raise click.ClickException(f"--student {student}: no such file or directory.")
    tokenizer = load_tokenizer(path.parent if path.is_file() else path, manifest)
    problems = compatibility_problems(tokenizer, AutoConfig.from_pretrained(student).vocab_size, manifest, student)
    if problems:
        raise click.ClickException("\n".join(problems))
    click.echo(f"{student} can train on {store}: same tokenizer, vocabulary {manifest.teacher['vocab_size']}.")


@main.command("eval")
@click.option("--teacher", required=True, help="The teacher's local HF model directory.")
@click.option("--student", required=True, help="The student's model directory (weights and tokenizer), e.g. a "
                                               "student-train --output.")
@click.option("--store", help="Store written by `teacher-cache build`: its held-out tail is evaluated.")
@click.option("--data", help="Instead of --store: text (jsonl/json/parquet/csv/txt, a folder, a saved dataset), "
                             "tokenized with the teacher's tokenizer and packed; every row is evaluated.")
@click.option("--text-field", default="text", show_default=True, help="Column of --data holding the text.")
@click.option("--split", default="train", show_default=True, help="Split of --data.")
@click.option("--seq-len", type=int, help="Positions per row with --data. Default: 512.")
@click.option("--samples", type=int, help="Evaluate at most this many rows (the first of the held-out part).")
@click.option("--held-out-fraction", type=float,
              help="Evaluate the store's last samples, the share training held out with the same --eval-fraction. "
                   "Default: 0.05, training's default.")
@click.option("--all", "all_samples", is_flag=True, help="Evaluate every sample of --store (a held-out store).")
@click.option("--output", help="Directory of report.json, report.md and report.png. Default: STUDENT/eval.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights of both models; auto = bfloat16 on CUDA, float32 on CPU.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per forward.")
@click.option("--chunk-positions", type=int, default=256, show_default=True,
              help="Positions whose logits exist at once, per model (memory vs speed).")
def eval_(**options) -> None:
    """Compare the teacher and the student on held-out text: LM loss, perplexity, KL(teacher || student), top-1
    agreement, calibration error, parameters, size on disk, speed and peak memory.

    \b
    Example:
      student-train eval --teacher /models/teacher --student runs/kd --store /cache/run1
    """
    from student_train.eval_report import markdown
    from student_train.evaluate import EvalConfig, evaluate

    try:
        report = evaluate(EvalConfig(**options))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown(report))
    click.echo(f"Report written to {options['output'] or Path(options['student']) / 'eval'} "
               "(report.json, report.md, report.png).")


if __name__ == "__main__":  # torchrun ... -m student_train.cli
    main()
