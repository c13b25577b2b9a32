"""The end-to-end demo behind `make demo`: teacher -> caches -> two students -> a table of held-out loss.

1. a small Llama-style teacher trained for a few minutes on local text (`tools.demo_teacher`);
2. `teacher-cache build` over the training text and over held-out text;
3. `student-train` twice with the same student, data and budget: with distillation (KD) and with CE only;
4. a table of held-out LM loss for the teacher (from the stored true-token log-probs), the KD student and the CE
   student.

Every step is cached in the demo directory and skipped when its output is complete, so a second run is quick.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np

from storage.identity import weights_fingerprint
from storage.reader import Store
from tools.demo_teacher import build_demo_teacher

log = logging.getLogger(__name__)

STUDENT_SHAPE = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": False}
SEQ_LEN = 256


def _run(*command: str) -> None:
    click.echo(f"$ {shlex.join(command)}")
    subprocess.run(command, check=True)


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def build_store(teacher: Path, dataset: Path, output: Path, samples: int) -> Path:
    """Build a store of the teacher's targets; reuse a complete one of this teacher, resume an interrupted one."""
    if (output / "manifest.json").exists():
        manifest = json.loads((output / "manifest.json").read_text())
        if manifest["teacher"]["weights_sha256"] != weights_fingerprint(teacher):
            shutil.rmtree(output)  # made by an earlier teacher
        elif manifest["complete"]:
            return output
    resume = ["--resume"] if output.exists() else []
    # float32 rather than `--dtype auto`, which picks bfloat16 on CPUs with AMX: the same numbers on every CPU.
    _run(_cli("teacher-cache"), "build", "--model", str(teacher), "--dataset", str(dataset), "--output", str(output),
         "--seq-len", str(SEQ_LEN), "--max-samples", str(samples), "--batch-size", "8", "--samples-per-shard", "128",
         "--dtype", "float32", *resume)
    return output


def write_student_config(teacher: Path, path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                **STUDENT_SHAPE).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_student(store: Path, eval_store: Path, student: Path, output: Path, *, alpha: float, steps: int,
                  targets: str = "sampled") -> dict:
    """Train one student (about a minute); reuse its result when the teacher, alpha and steps are unchanged."""
    final = output / "final_metrics.json"
    stamp = json.dumps([Store(store).manifest.teacher["weights_sha256"], alpha, steps, targets])
    if final.exists() and (output / ".demo-stamp").exists() and (output / ".demo-stamp").read_text() == stamp:
        return json.loads(final.read_text())
    shutil.rmtree(output, ignore_errors=True)
    _run(_cli("student-train"), "--store", str(store), "--eval-store", str(eval_store), "--student", str(student),
         "--output", str(output), "--targets-from", targets, "--alpha", str(alpha), "--max-steps", str(steps),
         "--batch-size", "8", "--lr", "2e-3", "--eval-every", str(steps), "--save-every", str(steps))
    (output / ".demo-stamp").write_text(stamp)
    return json.loads(final.read_text())


def parameters(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM

    return f"{AutoModelForCausalLM.from_pretrained(model_dir).num_parameters() / 1e6:.1f}M"


def teacher_heldout_loss(store: Path) -> float:
    """The teacher's LM loss on the held-out store: minus the mean stored true-token log-prob."""
    total, count = 0.0, 0
    for shard in Store(store).iter_shards():
        logp, mask = shard.array("true_logprob")[:], shard.array("loss_mask")[:]
        total -= float(logp[mask].sum(dtype=np.float64))
        count += int(mask.sum())
    return total / count


@click.command()
@click.option("--dir", "root", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True)
@click.option("--teacher-steps", type=int, default=560, show_default=True,
              help="Teacher optimizer steps (about 9 minutes on 2 idle cores). A step budget gives the same teacher "
              "on a busy machine, only later.")
@click.option("--teacher-seconds", type=float, default=None, help="Also stop the teacher after this many seconds.")
@click.option("--train-samples", type=int, default=600, show_default=True, help="Cached training samples.")
@click.option("--steps", type=int, default=150, show_default=True, help="Optimizer steps of each student.")
def main(root: Path, teacher_steps: int, teacher_seconds: float | None, train_samples: int, steps: int) -> None:
    """Run the whole pipeline on a small real teacher and compare a KD student with a CE student."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    teacher = build_demo_teacher(root / "teacher", max_seconds=teacher_seconds, max_steps=teacher_steps)
    corpus = teacher / "corpus"
    train_store = build_store(teacher, corpus / "train.jsonl", root / "cache-train", train_samples)
    eval_store = build_store(teacher, corpus / "heldout.jsonl", root / "cache-heldout", 64)
    student = write_student_config(teacher, root / "student-config")
    kd = train_student(train_store, eval_store, student, root / "student-kd", alpha=0.9, steps=steps)
    topk = train_student(train_store, eval_store, student, root / "student-kd-topk", alpha=0.9, steps=steps,
                         targets="topk_tail")
    ce = train_student(train_store, eval_store, student, root / "student-ce", alpha=0.0, steps=steps)
    size = parameters(root / "student-kd")
    rows = [(f"teacher ({parameters(teacher)})", teacher_heldout_loss(eval_store), None, None),
            (f"student, KD sampled ({size})", kd["lm_loss"], kd["kl"], kd["top1_agreement"]),
            (f"student, KD top-64+tail ({size})", topk["lm_loss"], topk["kl"], topk["top1_agreement"]),
            (f"student, CE only ({size})", ce["lm_loss"], ce["kl"], ce["top1_agreement"])]
    click.echo(f"\nheld-out ({eval_store}), {steps} steps x 8 x {SEQ_LEN} tokens per student")
    click.echo(f"{'model':<34}{'LM loss':>10}{'KL(t||s)':>10}{'top-1 agr.':>12}")
    for name, loss, kl, agree in rows:
        extra = f"{kl:>10.3f}{agree:>12.3f}" if kl is not None else f"{'':>10}{'':>12}"
        click.echo(f"{name:<34}{loss:>10.3f}{extra}")
    verdict = "beats" if kd["lm_loss"] < ce["lm_loss"] else "does NOT beat"
    click.echo(f"\nThe KD student (sampled targets) {verdict} the CE student by {ce['lm_loss'] - kd['lm_loss']:+.3f} "
               "nats of held-out loss, with the same data and steps.")


if __name__ == "__main__":
    main()
