"""On-policy distillation in rounds against off-policy KD, at equal teacher-scored tokens: SmolLM2-135M-Instruct
teaching its 6-layer pruned student, the teacher never beside the student.

Reuses what `benchmarks/seqkd.py` leaves under DIR/seqkd (run it first): the teacher's answers to the training
prompts (gen-train) and their store (cache-generated), the store of its answers to the held-out prompts
(cache-heldout), and the pruned student (student-init).

1. Warm start: the student learns from the teacher's answers to the first P - Q training prompts (the store's samples
   before the held-back ones; sparse KD as `seqkd` row c), --warm-steps steps.
2. From the warm student, --steps more steps each way, each spending about the teacher-scored tokens T of the
   teacher's answers to the last Q prompts:
   - off-policy: on the teacher's answers to those Q prompts (the held-back samples of cache-generated); its wall
     time counts their share of the teacher's generation and build;
   - on-policy, R rounds (R = 1, 2, 4; `distill-rounds`): round r, the student answers Q/R of those prompts, the
     teacher scores the answers (`build`), the student trains --steps/R steps on the scores: forward KL on the
     teacher's sampled targets at the student's own positions (no CE: the student's own text is no target);
   - on-policy, 2 rounds with `rollout_rkl`, the per-token estimator of the reverse KL, at --lr and at 5e-5;
   - on-policy, 2 rounds whose micro-batches are half the warm start's data again (`--mix`, GKD's lambda 0.5: the
     teacher's targets on its answers to the warm-start prompts, scored once, no new teacher tokens).
3. Every student (and every round): held-out loss and KL(teacher || student) on the teacher's held-out answers, the
   teacher's log-likelihood of the student's own answers to --heldout-prompts held-out prompts (sampled at T = 1 with
   the same seed, scored by `build`), the teacher tokens scored, wall time.

    python benchmarks/onpolicy.py --dir .demo

Writes DIR/onpolicy/onpolicy.{json,md,png}; rerun with the same options to reuse every finished step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from seqkd import generate, machine, timed_build, train  # noqa: E402

from storage.generated import read_generated  # noqa: E402
from storage.reader import Store  # noqa: E402
from tools.demo import teacher_heldout_loss  # noqa: E402
from tools.demo_chat import Steps, cli, reuse, sha256  # noqa: E402

STEPS = ("generate", "build", "train")  # a round's cost; its held-out evaluation is not counted
ROUNDS = {  # row -> (rounds, student-train options of each round)
    "on-policy, 1 round": (1, {"alpha": 1.0, "targets_from": "sampled"}),
    "on-policy, 2 rounds": (2, {"alpha": 1.0, "targets_from": "sampled"}),
    "on-policy, 4 rounds": (4, {"alpha": 1.0, "targets_from": "sampled"}),
    "on-policy, 2 rounds, rollout_rkl": (2, {"loss": {"rollout_rkl": 1.0}}),
    # Half of the micro-batches replay the warm start's teacher answers (GKD's lambda 0.5): no new teacher tokens.
    "on-policy, 2 rounds, half replayed warm-start data": (2, {"alpha": 1.0, "targets_from": "sampled",
                                                              "mix": {"WARM_STORE": 0.5}}),
    "on-policy, 2 rounds, rollout_rkl, lr 5e-5": (2, {"loss": {"rollout_rkl": 1.0}, "lr": 5e-5}),
}


def held_back(store: Path, gen: Path, prompts: int) -> tuple[list[int], list[int], int]:
    """(warm-start sample ids, held-back sample ids, teacher tokens of the answers to the last `prompts` prompts):
    the held-back samples are the store's last ones whose trained tokens reach those answers' tokens."""
    rows, _ = read_generated(gen)
    last = max(rows["prompt_id"]) + 1 - prompts
    target = sum(len(ids) for ids, pid in zip(rows["response_token_ids"], rows["prompt_id"], strict=True)
                 if pid >= last)
    counts = np.concatenate([shard.array("stats_num_tokens")[:] for shard in Store(store).iter_shards()])
    n, taken, tokens = len(counts), 0, 0
    while tokens < target:
        taken += 1
        tokens += int(counts[n - taken])
    return list(range(n - taken)), list(range(n - taken, n)), tokens


def warm_start_store(steps: Steps, teacher: Path, gen: Path, output: Path, samples: int) -> Path:
    """The teacher's targets on its answers to the warm-start prompts: the first `samples` samples of a build over
    all its training answers (the same packing as cache-generated's)."""
    if reuse(output, [sha256(gen / "generation.json"), samples]) and (output / "manifest.json").exists():
        return output
    steps.run(cli("teacher-cache"), "build", "--model", str(teacher), "--dataset", str(gen), "--output", str(output),
              "--seq-len", "512", "--batch-size", "4", "--dtype", "float32", "--max-samples", str(samples))
    return output


def prompt_slice(source: Path, output: Path, first: int) -> Path:
    """The prompts of `source` (jsonl) from row `first` on."""
    lines = source.read_text().splitlines()[first:]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in lines))
    return output


def scored_answers(steps: Steps, teacher: Path, student: Path, prompts: Path, output: Path, sampling: dict) -> float:
    """The teacher's mean log-prob per token of the student's answers to `prompts` (answered, then built)."""
    answers, _ = generate(steps, student, prompts, output / "answers", sampling)
    scored, _ = timed_build(steps, teacher, answers, output / "scored")
    return -teacher_heldout_loss(scored)


def rounds_run(steps: Steps, directory: Path, config: dict) -> list[dict]:
    """`distill-rounds` with `config` (kept in DIR/rounds.yaml); its summaries, initial evaluation first."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "rounds.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = Path(config["output"]) / "summary.json"
    if not summary.exists():
        steps.run(cli("distill-rounds"), "--config", str(path))
    return json.loads(summary.read_text())["rounds"]


@click.command()
@click.option("--dir", "root", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True)
@click.option("--held-back-prompts", type=click.IntRange(min=4), default=64, show_default=True,
              help="Q: training prompts kept from the warm start, whose answers phase 2 spends.")
@click.option("--heldout-prompts", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--warm-steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--steps", "phase_steps", type=click.IntRange(min=4), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
def main(root: Path, held_back_prompts: int, heldout_prompts: int, max_new_tokens: int, warm_steps: int,
         phase_steps: int, batch_size: int, lr: float) -> None:
    """Off-policy KD against on-policy rounds at equal teacher-scored tokens (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    steps, seqkd, out = Steps(), root / "seqkd", root / "onpolicy"
    teacher, student_init = root / "smollm2", seqkd / "student-init"
    store, heldout_store = seqkd / "cache-generated", seqkd / "cache-heldout"
    missing = [p for p in (teacher, student_init, store, heldout_store, seqkd / "gen-train") if not p.exists()]
    if missing:
        raise click.UsageError(f"{', '.join(map(str, missing))} missing: run benchmarks/seqkd.py --dir {root} first.")
    out.mkdir(parents=True, exist_ok=True)
    warm_ids, back_ids, back_tokens = held_back(store, seqkd / "gen-train", held_back_prompts)
    for name, ids in (("warm", warm_ids), ("held-back", back_ids)):
        (out / f"{name}.json").write_text(json.dumps({"sample_ids": ids}))
    train_prompts = root / "chat" / "train.jsonl"
    phase_prompts = prompt_slice(train_prompts, out / "held-back-prompts.jsonl",
                                 len(train_prompts.read_text().splitlines()) - held_back_prompts)
    heldout = prompt_slice(root / "chat" / "heldout.jsonl", out / "heldout-prompts.jsonl", 0)
    heldout.write_text("".join(heldout.read_text().splitlines(keepends=True)[:heldout_prompts]))
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": 0, "batch_size": 16,
                "keep_truncated": True, "keep_duplicates": True, "keep_empty": True}
    base = {"batch_size": batch_size, "lr": lr, "seed": 0}

    # 1. Warm start, and the off-policy row.
    warm_metrics, warm_seconds = train(steps, store, heldout_store, student_init, out / "warm", [],
                                       base | {"max_steps": warm_steps, "targets_from": "sampled",
                                               "selection": str(out / "warm.json")})
    warm = out / "warm"
    rows = [{"row": "warm start", "rounds": 0, "heldout_loss": warm_metrics["lm_loss"],
             "heldout_kl": warm_metrics["kl"],
             "teacher_loglik": scored_answers(steps, teacher, warm, heldout, out / "eval-warm", sampling),
             "teacher_tokens": 0, "seconds": 0.0, "curve": []}]
    off_metrics, off_seconds = train(steps, store, heldout_store, warm, out / "off-policy", [],
                                     base | {"max_steps": phase_steps, "targets_from": "sampled",
                                             "selection": str(out / "held-back.json")})
    # The held-back answers' share of the teacher's generation and build (benchmarks/seqkd.py's timings).
    share = back_tokens / Store(store).manifest.num_tokens
    data_seconds = share * sum(float((seqkd / f".{name}.seconds").read_text()) for name in ("gen-train",
                                                                                            "cache-generated"))
    rows.append({"row": "off-policy KD, teacher's answers", "rounds": 0, "heldout_loss": off_metrics["lm_loss"],
                 "heldout_kl": off_metrics["kl"],
                 "teacher_loglik": scored_answers(steps, teacher, out / "off-policy", heldout, out / "eval-off",
                                                  sampling),
                 "teacher_tokens": back_tokens, "seconds": off_seconds + data_seconds,
                 "curve": []})

    # 2. On-policy rounds; the mixed rows replay the warm start's data: the teacher's answers as its first samples.
    warm_store = warm_start_store(steps, teacher, seqkd / "gen-train", out / "cache-warm", len(warm_ids))
    for label, (count, loss) in ROUNDS.items():
        if "mix" in loss:
            loss = loss | {"mix": {str(warm_store): share for share in loss["mix"].values()}}
        directory = out / label.replace(", ", "-").replace(" ", "-")
        config = {
            "teacher": str(teacher), "student": str(warm), "prompts": str(phase_prompts),
            "prompts_per_round": held_back_prompts // count, "output": str(directory / "run"), "rounds": count,
            "heldout_prompts": str(heldout), "eval_store": str(heldout_store), "seed": 1, "eval_seed": 0,
            "generate": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "batch_size": 16, "dtype": "float32",
                         "device": "cpu"},
            "build": {"seq_len": 512, "batch_size": 4, "dtype": "float32", "device": "cpu"},
            "train": base | loss | {"max_steps": phase_steps // count, "eval_every": phase_steps // count,
                                    "save_every": phase_steps // count, "device": "cpu"},
        }
        summaries = rounds_run(steps, directory, config)
        trained = [s for s in summaries if s["round"] != "initial"]
        last = trained[-1]
        scored = np.cumsum([s["teacher_tokens"]["train_store"] for s in trained]).tolist()
        rows.append({"row": label, "rounds": count, "heldout_loss": last["held_out"]["lm_loss"],
                     "heldout_kl": last["held_out"]["kl"], "teacher_loglik": last["teacher_loglik"]["per_token"],
                     "teacher_tokens": scored[-1],
                     "seconds": sum(s["seconds"][name] or 0.0 for s in trained for name in STEPS),
                     "curve": [(tokens, s["teacher_loglik"]["per_token"], s["held_out"]["kl"])
                               for tokens, s in zip(scored, trained, strict=True)]})

    result = {"machine": machine(), "held_back_prompts": held_back_prompts, "heldout_prompts": heldout_prompts,
              "warm_steps": warm_steps, "steps": phase_steps, "train": base, "sampling": sampling,
              "teacher_loglik_of_own_samples": -teacher_heldout_loss(heldout_store), "rows": rows,
              "wall_seconds": time.perf_counter() - steps.start}
    (out / "onpolicy.json").write_text(json.dumps(result, indent=2))
    (out / "onpolicy.md").write_text(table(result))
    plot(result, out / "onpolicy.png")
    click.echo(table(result))


def table(result: dict) -> str:
    lines = [f"machine: {result['machine']}; warm start {result['warm_steps']} steps, then {result['steps']} steps "
             f"each way; held-out: {result['heldout_prompts']} prompts; the teacher's log-likelihood of its own "
             f"held-out answers: {result['teacher_loglik_of_own_samples']:.3f} nats/token", "",
             "| row | teacher LL of the student's samples | held-out loss | KL(t‖s) | teacher tokens scored | "
             "wall s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['teacher_loglik']:.3f} | {r['heldout_loss']:.3f} | {r['heldout_kl']:.3f} | "
                     f"{r['teacher_tokens']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Against the teacher tokens scored after the warm start: the teacher's log-likelihood of the student's samples
    (left) and the held-out KL(teacher || student) on the teacher's answers (right), a point per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    warm = result["rows"][0]
    for r in result["rows"][1:]:
        curve = r["curve"] or [(r["teacher_tokens"], r["teacher_loglik"], r["heldout_kl"])]
        tokens = [0] + [point[0] for point in curve]
        for ax, column, start in ((axes[0], 1, warm["teacher_loglik"]), (axes[1], 2, warm["heldout_kl"])):
            ax.plot(tokens, [start] + [point[column] for point in curve], marker="o", label=r["row"])
    axes[0].set_ylabel("teacher log-prob per token of the student's samples")
    axes[1].set_ylabel("held-out KL(teacher || student), nats/token")
    for ax in axes:
        ax.set_xlabel("teacher-scored tokens after the warm start")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct -> 6-layer student: on-policy rounds vs off-policy KD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
