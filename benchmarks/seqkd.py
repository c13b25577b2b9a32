"""Sequence-level KD with `teacher-cache generate`: a student trained on the original data against students trained on
the teacher's own generations, with and without its cached targets.

Flow (every step cached under --dir, as `make demo-chat` caches its own; the conversations are the demo's):
1. conversations made from local text (`tools.demo_chat`: "continue this passage" from Shakespeare, "what does this
   function do?" from the standard library), train and held-out sets with disjoint prompts;
2. the teacher SmolLM2-135M-Instruct answers the prompts of both sets (`teacher-cache generate`, temperature 1);
3. `teacher-cache build` over the original training conversations, the teacher's training generations and its
   held-out generations (the held-out store every student is evaluated on), and `merge` of the first two;
4. a student from the teacher's layers (`student-init`), trained four ways with the same steps, batch and seed:
   (a) CE on the original data, (b) CE on the teacher's generations (sequence-level KD), (c) sparse KD on the
   teacher's generations (the stored draws, `--targets-from sampled`), (d) (c) on the generations plus the original
   data (the merged store);
5. each student answers the held-out prompts (`generate`), and the teacher scores those answers (`build`): the
   teacher's per-token log-likelihood of the student's own generations;
6. DIR/seqkd/seqkd.{json,md}: per student, its held-out loss and KL(teacher || student) on the teacher's held-out
   generations (KL over the stored top-64 + tail), the teacher's log-likelihood of the student's own samples, and
   for the data it trains on: rows (conversations or responses), trained tokens, store bytes per row and per
   trained token, and the wall time (generation + build) per row.

    python benchmarks/seqkd.py --dir .demo --train-prompts 256 --heldout-prompts 64 --steps 60

Writes DIR/seqkd/seqkd.{json,md}; rerun with the same options to reuse every finished step.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.generated import read_generated  # noqa: E402
from storage.identity import weights_fingerprint  # noqa: E402
from storage.reader import Store  # noqa: E402
from tools.demo import teacher_heldout_loss  # noqa: E402
from tools.demo_chat import SEQ_LEN, Steps, chat_data, cli, init_student, reuse, sha256  # noqa: E402
from tools.smollm2 import build_smollm2  # noqa: E402

ARMS = {  # row -> (training data, student-train options)
    "a. CE, original data": ("original", ["--alpha", "0"]),
    "b. CE, teacher generations (sequence KD)": ("generated", ["--alpha", "0"]),
    "c. sparse KD, teacher generations": ("generated", ["--targets-from", "sampled"]),
    "d. sparse KD, generations + original": ("both", ["--targets-from", "sampled"]),
}


def generate(steps: Steps, model: Path, prompts: Path, output: Path, options: dict) -> tuple[Path, float]:
    """`teacher-cache generate` of `model` over `prompts`, reused when done from the same inputs; (output, seconds)."""
    timing = output.with_name(f".{output.name}.seconds")
    if reuse(output, [weights_fingerprint(model), sha256(prompts), options]) and (output / "generation.json").exists():
        return output, float(timing.read_text())
    flags = [item for key, value in options.items() if value is not False
             for item in (f"--{key.replace('_', '-')}", *([] if value is True else [str(value)]))]
    start = time.perf_counter()
    steps.run(cli("teacher-cache"), "generate", "--model", str(model), "--prompts", str(prompts), "--output",
              str(output), "--dtype", "float32", *flags)
    seconds = time.perf_counter() - start
    timing.write_text(str(seconds))
    return output, seconds


def timed_build(steps: Steps, teacher: Path, dataset: Path, output: Path) -> tuple[Path, float]:
    """The teacher's store of `dataset` (a jsonl file or a generated dataset), reused when complete; (store,
    seconds of the build that made it)."""
    timing = output.with_name(f".{output.name}.seconds")
    digest = sha256(dataset / "generation.json" if dataset.is_dir() else dataset)
    kept = reuse(output, [weights_fingerprint(teacher), digest, SEQ_LEN])
    if kept and (output / "manifest.json").exists() and Store(output).manifest.complete and timing.exists():
        return output, float(timing.read_text())
    start = time.perf_counter()
    steps.run(cli("teacher-cache"), "build", "--model", str(teacher), "--dataset", str(dataset), "--output",
              str(output), "--format", "messages", "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--dtype",
              "float32", *(["--resume"] if kept else []))
    timing.write_text(str(time.perf_counter() - start))
    return output, float(timing.read_text())


def merged(steps: Steps, stores: list[Path], output: Path) -> Path:
    if reuse(output, [sha256(s / "manifest.json") for s in stores]) and (output / "manifest.json").exists():
        return output
    steps.run(cli("teacher-cache"), "merge", *map(str, stores), "--output", str(output))
    return output


def train(steps: Steps, store: Path, heldout: Path, student: Path, output: Path, flags: list[str],
          options: dict) -> tuple[dict, float]:
    final, timing = output / "final_metrics.json", output.with_name(f".{output.name}.seconds")
    inputs = [sha256(store / "manifest.json"), sha256(heldout / "manifest.json"), weights_fingerprint(student),
              flags, options]
    if not (reuse(output, inputs) and final.exists()):
        given = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        start = time.perf_counter()
        steps.run(cli("student-train"), "--store", str(store), "--eval-store", str(heldout), "--student",
                  str(student), "--output", str(output), *flags, *given, "--eval-every", str(options["max_steps"]),
                  "--save-every", str(options["max_steps"]))
        timing.write_text(str(time.perf_counter() - start))
    return json.loads(final.read_text()), float(timing.read_text())


def generated_tokens(output: Path) -> int:
    rows, _ = read_generated(output)
    return sum(len(ids) for ids in rows["response_token_ids"])


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


@click.command()
@click.option("--dir", "root", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True)
@click.option("--train-prompts", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--heldout-prompts", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=160, show_default=True)
@click.option("--keep-layers", default="0,6,12,18,24,29", show_default=True)
@click.option("--steps", "train_steps", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(root: Path, train_prompts: int, heldout_prompts: int, max_new_tokens: int, keep_layers: str,
         train_steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Sequence-level KD on SmolLM2-135M-Instruct: four students, one table (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    steps, out = Steps(), root / "seqkd"
    data = chat_data(steps, root / "chat", train=train_prompts, heldout=heldout_prompts, seed=seed)
    build_smollm2(root / "smollm2")
    teacher = root / "smollm2"
    # Truncated replies are kept: at temperature 1, SmolLM2-135M runs past 160 tokens in over half of its answers.
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": seed, "batch_size": 16,
                "keep_truncated": True}
    gen, gen_seconds = {}, {}
    for name in ("train", "heldout"):
        gen[name], gen_seconds[name] = generate(steps, teacher, data[name], out / f"gen-{name}", sampling)
    stores, build_seconds = {}, {}
    for name, dataset in (("original", data["train"]), ("generated", gen["train"]), ("heldout", gen["heldout"])):
        stores[name], build_seconds[name] = timed_build(steps, teacher, dataset, out / f"cache-{name}")
    stores["both"] = merged(steps, [stores["generated"], stores["original"]], out / "cache-both")
    student = init_student(steps, teacher, out / "student-init", keep_layers)
    options = {"max_steps": train_steps, "batch_size": batch_size, "lr": lr, "seed": seed}

    rows = []
    for index, (label, (source, flags)) in enumerate(ARMS.items()):
        metrics, seconds = train(steps, stores[source], stores["heldout"], student, out / f"student-{index}", flags,
                                 options)
        answers, _ = generate(steps, out / f"student-{index}", data["heldout"], out / f"answers-{index}", sampling)
        scored, _ = timed_build(steps, teacher, answers, out / f"scored-{index}")
        rows.append({"row": label, "heldout_loss": metrics["lm_loss"], "heldout_kl": metrics["kl"],
                     "teacher_loglik_of_samples": -teacher_heldout_loss(scored), "train_seconds": seconds,
                     **data_costs(source, data, gen, stores, gen_seconds, build_seconds)})
    teacher_own = -teacher_heldout_loss(stores["heldout"])
    result = {"machine": machine(), "train": options, "generate": sampling,
              "teacher_loglik_of_own_samples": teacher_own, "heldout_tokens": Store(stores["heldout"]).manifest
              .num_tokens, "generation": {name: {"tokens": generated_tokens(gen[name]), "seconds": gen_seconds[name]}
                                          for name in gen}, "rows": rows}
    (out / "seqkd.json").write_text(json.dumps(result, indent=2))
    (out / "seqkd.md").write_text(table(result))
    click.echo(table(result))


def machine() -> str:
    """The CPU's model name (Linux), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0]} x {len(names)}" if names else platform.processor() or platform.machine()


def data_costs(source: str, data: dict, gen: dict, stores: dict, gen_seconds: dict, build_seconds: dict) -> dict:
    """For the training data of a row: its rows (conversations or responses), trained tokens, store bytes per row
    and per trained token, and the wall time per row of making it (generation + build)."""
    parts = {"original": ["original"], "generated": ["generated"], "both": ["generated", "original"]}[source]
    rows = sum(read_generated(gen["train"])[1]["rows"] if p == "generated" else
               len(data["train"].read_text().splitlines()) for p in parts)
    tokens, size = Store(stores[source]).manifest.num_tokens, store_bytes(stores[source])
    seconds = sum(build_seconds[p] + (gen_seconds["train"] if p == "generated" else 0.0) for p in parts)
    return {"train_rows": rows, "train_tokens": tokens, "bytes_per_row": size / rows, "bytes_per_token": size / tokens,
            "seconds_per_row": seconds / rows}


def table(result: dict) -> str:
    lines = [f"teacher log-likelihood of its own held-out samples: {result['teacher_loglik_of_own_samples']:.3f} "
             f"nats/token; held-out: {result['heldout_tokens']} teacher-generated tokens",
             "", "| row | held-out loss | KL(t‖s) | teacher LL of the student's samples | train rows | trained tokens "
             "| bytes/row | bytes/token | data s/row | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['heldout_loss']:.3f} | {r['heldout_kl']:.3f} | "
                     f"{r['teacher_loglik_of_samples']:.3f} | {r['train_rows']} | {r['train_tokens']:,} | "
                     f"{r['bytes_per_row']:,.0f} | {r['bytes_per_token']:.0f} | {r['seconds_per_row']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    for name, g in result["generation"].items():
        lines.append(f"\ngeneration ({name}): {g['tokens']} tokens in {g['seconds']:.0f} s (with model load): "
                     f"{g['tokens'] / g['seconds']:.1f} tok/s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
