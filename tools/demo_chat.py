"""The conversation demo behind `make demo-chat`: a real instruct teacher -> chat stores -> two students -> a table.

1. conversations made from local text only, in the `messages` format: "continue this passage" from Shakespeare and
   "what does this function do?" from the Python standard library's sources (the docstring's first paragraph is
   the reply), a few with a system turn, the held-out conversations disjoint from the training ones;
2. the teacher: SmolLM2-135M-Instruct (ChatML template, 49k vocabulary), converted once by `tools.smollm2`;
3. `teacher-cache build` over both sets: replies trained (assistant-only loss mask), packed conversations isolated;
4. a student: `student-init` keeps a few of the teacher's layers, with its tokenizer and chat template;
5. `student-train` twice from that student with the same data, steps and seed: with distillation and with CE only;
6. a table of held-out loss on the assistant tokens for the teacher (from the stored true-token log-probs), the KD
   student and the CE student, their KL to the teacher, and the wall time of each step.

Every step is cached in the demo directory, with a stamp of its inputs beside its output: a step whose inputs are
unchanged is skipped when complete and continued when interrupted (stores), and redone from scratch otherwise.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import click

from storage.identity import weights_fingerprint
from storage.reader import Store
from tools.demo import parameters, teacher_heldout_loss
from tools.demo_teacher import SHAKESPEARE
from tools.smollm2 import DownloadError, build_smollm2

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]  # {"role", "content"} turns
PASSAGE_PROMPT = "Continue this passage:\n"
FUNCTION_PROMPT = "What does this function do?\n"
PASSAGE_SYSTEM = "You are a scholar of Shakespeare. Continue each passage in the voice of its speaker."
FUNCTION_SYSTEM = "You are a Python expert. Explain code in one short paragraph."
MAX_CHARS = 640  # the content of a conversation: under ~256 tokens with the template, for prose and code alike
SEQ_LEN = 512
STAMP_FORMAT = 1
POSITIVE = click.IntRange(min=1)


def passage_conversations(text: str, *, max_lines: int = 4, max_chars: int = MAX_CHARS) -> list[Conversation]:
    """"Continue this passage" conversations from a play's text, one per speech of at least four lines.

    A speech is a paragraph whose first line names the speaker ("NAME:"). The prompt holds the speaker and the
    first half of the speech's lines (at most `max_lines`), the reply the lines after them (at most `max_lines`).
    Speeches whose conversation would exceed `max_chars` characters of content are left out.
    """
    conversations = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.strip().splitlines()
        if len(lines) < 5 or not lines[0].endswith(":"):
            continue
        speaker, *lines = lines
        cut = min(len(lines) // 2, max_lines)
        prompt = PASSAGE_PROMPT + "\n".join([speaker, *lines[:cut]])
        reply = "\n".join(lines[cut:cut + max_lines])
        if len(prompt) + len(reply) <= max_chars:
            conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])
    return conversations


def function_conversations(sources: Iterable[str], *, max_lines: int = 16,
                           max_chars: int = MAX_CHARS) -> list[Conversation]:
    """"What does this function do?" conversations from Python sources, one per documented function.

    The prompt holds the function's `def` line and body without its docstring (dedented), the reply the first
    paragraph of the docstring on one line. Functions whose code has more than `max_lines` lines, or whose
    conversation would exceed `max_chars` characters of content, are left out, as are functions with nothing but
    a docstring.
    """
    conversations = []
    for source in sources:
        lines = source.split("\n")  # as ast counts lines (splitlines() also splits at form feeds)
        functions = [node for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node)]
        for node in sorted(functions, key=lambda function: function.lineno):  # in the order of the source
            if not _docstring_on_own_lines(node, lines):
                continue
            docstring = node.body[0]
            body = lines[docstring.end_lineno:node.end_lineno]
            while not body[0].strip():  # the blank lines that followed the docstring
                body = body[1:]
            code_lines = lines[node.lineno - 1:docstring.lineno - 1] + body
            code = textwrap.dedent("\n".join(code_lines)).strip()
            summary = " ".join(ast.get_docstring(node).split("\n\n")[0].split())
            prompt = FUNCTION_PROMPT + code
            if len(code_lines) <= max_lines and len(prompt) + len(summary) <= max_chars:
                conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": summary}])
    return conversations


def _docstring_on_own_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """Whether the function's docstring has lines of its own, and code after them (not only the docstring)."""
    docstring = function.body[0]
    return (len(function.body) > 1 and not lines[docstring.lineno - 1][:docstring.col_offset].strip()
            and function.body[1].lineno > docstring.end_lineno)


def stdlib_sources() -> list[str]:
    """The sources of the standard library's top-level modules (not its packages), in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path.read_text(encoding="utf-8") for path in sorted(root.glob("*.py"))]


def mix_conversations(pools: Sequence[tuple[str, list[Conversation]]], *, train: int, heldout: int, seed: int,
                      system_share: float = 0.25) -> tuple[list[Conversation], list[Conversation]]:
    """Training and held-out conversations drawn evenly from `pools`, disjoint, the same for the same seed.

    Each pool is a (system prompt, conversations) pair. A conversation that repeats the content of a turn seen
    before (in any pool) is dropped, so no prompt or reply is both trained and held out. The pools are shuffled
    with `seed` and taken in turn; the first `heldout` conversations are held out, the next `train` trained on.
    A `system_share` of them, chosen with `seed`, open with their pool's system prompt.

    Raises:
        ValueError: the pools hold fewer than `train + heldout` distinct conversations.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    shuffled = []
    for system, conversations in pools:
        distinct = []
        for conversation in conversations:
            contents = [turn["content"] for turn in conversation]
            if seen.isdisjoint(contents):
                seen.update(contents)
                distinct.append((system, conversation))
        shuffled.append(rng.sample(distinct, len(distinct)))
    mixed = [pool[i] for i in range(max(map(len, shuffled), default=0)) for pool in shuffled if i < len(pool)]
    if len(mixed) < train + heldout:
        raise ValueError(f"{train} training and {heldout} held-out conversations need {train + heldout} distinct "
                         f"ones, and the sources give {len(mixed)}; lower --train-conversations or "
                         "--heldout-conversations.")
    chosen = [[{"role": "system", "content": system}, *conversation] if rng.random() < system_share else conversation
              for system, conversation in mixed[:train + heldout]]
    return chosen[heldout:], chosen[:heldout]


def write_conversations(path: Path, conversations: list[Conversation]) -> Path:
    """Write `conversations` as JSONL rows {"messages": [...]} (atomically: a temporary name, then `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    os.replace(partial, path)
    return path


class Steps:
    """The demo's steps: each one timed, its commands printed as they run, its output kept between runs."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, bool]] = []  # (step, seconds, whether it did any work)
        self.worked = False
        self.start = time.perf_counter()

    @contextmanager
    def step(self, name: str):
        """Time the step `name`; it counts as cached unless it runs a command or sets `worked`."""
        self.worked, start = False, time.perf_counter()
        yield
        self.times.append((name, time.perf_counter() - start, self.worked))

    def run(self, *command: str) -> None:
        """Print `command` as a shell line and run it; a failure ends the demo with the command's own message."""
        click.echo(f"$ {shlex.join(command)}")
        self.worked = True
        if subprocess.run(command).returncode != 0:
            raise click.ClickException(f"{Path(command[0]).name} failed (its message is above); fix that and run the "
                                       "demo again: finished steps are kept.")


def cli(name: str) -> str:
    """The path of one of the project's commands, installed beside this Python."""
    return str(Path(sys.executable).with_name(name))


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reuse(output: Path, inputs: list) -> bool:
    """Whether `output` was started from these same `inputs` (JSON values) and may be kept; otherwise delete it and
    record `inputs` in its stamp, beside it, for the next run."""
    stamp = output.with_name(f".{output.name}.stamp")
    text = json.dumps([STAMP_FORMAT, *inputs])
    if output.exists() and stamp.is_file() and stamp.read_text() == text:
        return True
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)
    return False


def chat_data(steps: Steps, directory: Path, *, train: int, heldout: int, seed: int) -> dict[str, Path]:
    """train.jsonl and heldout.jsonl of `directory`, written unless made from the same sizes and seed."""
    paths = {"train": directory / "train.jsonl", "heldout": directory / "heldout.jsonl"}
    if reuse(directory, [train, heldout, seed]) and all(path.exists() for path in paths.values()):
        return paths
    pools = [(PASSAGE_SYSTEM, passage_conversations(SHAKESPEARE.read_text(encoding="utf-8"))),
             (FUNCTION_SYSTEM, function_conversations(stdlib_sources()))]
    rows = dict(zip(("train", "heldout"), mix_conversations(pools, train=train, heldout=heldout, seed=seed),
                    strict=True))
    for name, path in paths.items():
        write_conversations(path, rows[name])
        click.echo(f"wrote {len(rows[name])} conversations to {path}")
    steps.worked = True
    return paths


def build_store(steps: Steps, teacher: Path, dataset: Path, output: Path) -> Path:
    """The teacher's store of `dataset`'s conversations: kept when complete, resumed when interrupted."""
    kept = reuse(output, [weights_fingerprint(teacher), sha256(dataset), SEQ_LEN])
    if kept and (output / "manifest.json").exists() and Store(output).manifest.complete:
        return output
    steps.run(cli("teacher-cache"), "build", "--model", str(teacher), "--dataset", str(dataset), "--output",
              str(output), "--format", "messages", "--seq-len", str(SEQ_LEN), "--batch-size", "4",
              *(["--resume"] if kept else []))
    return output


def init_student(steps: Steps, teacher: Path, output: Path, keep_layers: str) -> Path:
    """A student of the teacher's layers `keep_layers` ("0,6,-1"), with the teacher's tokenizer and chat template."""
    if reuse(output, [weights_fingerprint(teacher), keep_layers]):  # student-init writes all of its output or none
        return output
    steps.run(cli("student-init"), "--teacher", str(teacher), "--output", str(output), "--keep-layers", keep_layers)
    return output


def train_student(steps: Steps, stores: dict[str, Path], student: Path, output: Path, *, alpha: float | None,
                  options: dict[str, int | float]) -> dict:
    """Train one student from `student` on the training store, with the default loss (KD) or `alpha`; its held-out
    metrics (final_metrics.json)."""
    final = output / "final_metrics.json"
    inputs = [sha256(stores["train"] / "manifest.json"), sha256(stores["heldout"] / "manifest.json"),
              weights_fingerprint(student), alpha, options]
    if not (reuse(output, inputs) and final.exists()):
        shutil.rmtree(output, ignore_errors=True)
        given = options | ({} if alpha is None else {"alpha": alpha})
        flags = [item for key, value in given.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        steps.run(cli("student-train"), "--store", str(stores["train"]), "--eval-store", str(stores["heldout"]),
                  "--student", str(student), "--output", str(output), *flags,
                  "--eval-every", str(options["max_steps"]), "--save-every", str(options["max_steps"]))
    return json.loads(final.read_text())


def report(stores: dict[str, Path], teacher: Path, student: Path, kd: dict, ce: dict, options: dict,
           steps: Steps) -> None:
    """Print the table of held-out losses and the wall time of each step."""
    heldout = Store(stores["heldout"]).manifest
    teacher_size, student_size = parameters(teacher), parameters(student)
    layers = json.loads((student / "student_init.json").read_text())["layers"]
    click.echo(f"\nheld-out ({stores['heldout']}): {heldout.num_tokens:,} assistant tokens in {heldout.num_samples} "
               f"samples of {SEQ_LEN}; each student {options['max_steps']} steps x {options['batch_size']} x "
               f"{SEQ_LEN} positions, lr {options['lr']}, seed {options['seed']}")
    click.echo(f"{'model':<42}{'loss (assistant)':>18}{'KL(t||s)':>10}{'top-1 agr.':>12}")
    teacher_label = f"teacher SmolLM2-135M-Instruct ({teacher_size})"
    click.echo(f"{teacher_label:<42}{teacher_heldout_loss(stores['heldout']):>18.3f}")
    name = f"student {len(layers['kept'])}/{layers['teacher']} layers"
    for label, metrics in ((f"{name}, KD ({student_size})", kd), (f"{name}, CE only ({student_size})", ce)):
        click.echo(f"{label:<42}{metrics['lm_loss']:>18.3f}{metrics['kl']:>10.3f}{metrics['top1_agreement']:>12.3f}")
    gain = ce["lm_loss"] - kd["lm_loss"]
    click.echo(f"\nThe KD student's held-out loss on the assistant tokens is {abs(gain):.3f} nats "
               f"{'below' if gain > 0 else 'above'} the CE student's, its KL to the teacher {kd['kl']:.3f} against "
               f"{ce['kl']:.3f}, with the same data, steps and seed.")
    click.echo(f"\n{'step':<30}{'wall time':>12}")
    for step, seconds, worked in steps.times:
        click.echo(f"{step:<30}{seconds:>11.1f}s{'' if worked else '  (cached)'}")
    click.echo(f"{'whole run':<30}{time.perf_counter() - steps.start:>11.1f}s")


@click.command()
@click.option("--dir", "root", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True)
@click.option("--train-conversations", type=POSITIVE, default=560, show_default=True,
              help="Training conversations (about 110 tokens each; SmolLM2 caches ~300 tokens/s on 2 cores).")
@click.option("--heldout-conversations", type=POSITIVE, default=128, show_default=True,
              help="Held-out conversations.")
@click.option("--keep-layers", default="0,6,12,18,24,29", show_default=True,
              help="The teacher's layers (of 30) the student keeps, as `student-init --keep-layers`. With the last "
              "layer the student starts 4 nats of held-out loss lower than with 0,5,...,25, and trains better.")
@click.option("--steps", type=POSITIVE, default=40, show_default=True, help="Optimizer steps of each student.")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="Samples of 512 positions per step.")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak learning rate of each student.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the conversations and of training.")
def main(root: Path, train_conversations: int, heldout_conversations: int, keep_layers: str, steps: int,
         batch_size: int, lr: float, seed: int) -> None:
    """Run the conversation pipeline on SmolLM2-135M-Instruct and compare a KD student with a CE student."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = {"max_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    try:
        run_demo(root, train_conversations=train_conversations, heldout_conversations=heldout_conversations,
                 keep_layers=keep_layers, options=options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except DownloadError as exc:
        raise click.ClickException(str(exc)) from None


def run_demo(root: Path, *, train_conversations: int, heldout_conversations: int, keep_layers: str,
             options: dict[str, int | float]) -> None:
    """Every step of the demo in `root`, then the table (see the module docstring)."""
    clock = Steps()
    with clock.step("conversations"):  # first: sizes the sources cannot give fail before any long step
        data = chat_data(clock, root / "chat", train=train_conversations, heldout=heldout_conversations,
                         seed=options["seed"])
    with clock.step("teacher (SmolLM2 conversion)"):
        _, clock.worked = build_smollm2(root / "smollm2")
    teacher = root / "smollm2"
    stores = {}
    for name in ("train", "heldout"):
        with clock.step(f"teacher-cache build ({name})"):
            stores[name] = build_store(clock, teacher, data[name], root / f"chat-cache-{name}")
    clock.run(cli("teacher-cache"), "info", str(stores["train"]))
    with clock.step("student-init"):
        student = init_student(clock, teacher, root / "chat-student-init", keep_layers)
    with clock.step("student-train (KD)"):
        kd = train_student(clock, stores, student, root / "chat-student-kd", alpha=None, options=options)
    with clock.step("student-train (CE only)"):
        ce = train_student(clock, stores, student, root / "chat-student-ce", alpha=0.0, options=options)
    report(stores, teacher, student, kd, ce, options, clock)


if __name__ == "__main__":
    main()
