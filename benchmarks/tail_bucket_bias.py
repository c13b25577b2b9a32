"""How much the vllm backend's sampled targets (draws from top-k plus one tail bucket) miss, against exact draws.

Exact random-sampling KD draws from the teacher's full distribution p: its expected gradient on the student's logits
is q - p, the full forward KL's. The vllm backend draws from the top-k plus one tail bucket, and the loss gives the
bucket the student's mass outside the top-k, so its expected gradient is q - p~, where p~ equals p on the top-k
and spreads the tail mass m like the student does, m * q_j / q_tail. This script computes both, exactly (no
sampling noise), at every held-out position of a store, for a real teacher and a real student:

  - tail mass m: the share of draws that land in the bucket;
  - hidden KL: full KL(p || q) minus the (K + 1)-bucket KL = m * KL(p_tail / m || q_tail / q_tail-mass), the part
    of the KL the bucket target cannot see, as a share of the full KL;
  - gradient bias: |p~ - p|_1 / |q - p|_1, the bias of the expected gradient relative to its size.

    python benchmarks/tail_bucket_bias.py --teacher .demo/teacher --student .demo/student-ce \\
        --store .demo/cache-heldout [--k 8,16,64] [--max-samples 32] [--json out.json]

(`make demo` builds those three.)
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import click
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.reader import Store  # noqa: E402


def bias_at(logp_PV: torch.Tensor, logq_PV: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-position tail mass, full and bucket KL, and the gradient bias ratio for a top-k of size k (float64)."""
    p_PV, q_PV = logp_PV.exp(), logq_PV.exp()
    top_PK = logp_PV.topk(k, -1).indices
    head_PV = torch.zeros_like(p_PV, dtype=torch.bool).scatter_(1, top_PK, True)
    m_P = torch.where(head_PV, 0.0, p_PV).sum(-1)
    q_tail_P = torch.where(head_PV, 0.0, q_PV).sum(-1)
    full_P = (p_PV * (logp_PV - logq_PV)).sum(-1)
    p_b = torch.cat([p_PV.gather(1, top_PK), m_P[:, None]], -1)
    q_b = torch.cat([q_PV.gather(1, top_PK), q_tail_P[:, None]], -1)
    bucket_P = (p_b * (p_b.log() - q_b.log())).sum(-1)
    p_tilde_PV = torch.where(head_PV, p_PV, m_P[:, None] * q_PV / q_tail_P[:, None])
    grad_bias_P = (p_tilde_PV - p_PV).abs().sum(-1) / (q_PV - p_PV).abs().sum(-1)
    return {"tail_mass": m_P, "full_kl": full_P, "hidden_kl": full_P - bucket_P, "grad_bias": grad_bias_P}


@click.command()
@click.option("--teacher", required=True, help="Teacher model directory.")
@click.option("--student", required=True, help="Student model directory (same tokenizer).")
@click.option("--store", required=True, help="A store of held-out samples (its input ids are used).")
@click.option("--k", "ks", default="8,16,64", show_default=True, help="Top-k sizes, comma-separated.")
@click.option("--max-samples", type=int, default=32, show_default=True)
@click.option("--json", "json_path", help="Write the table as JSON here.")
def main(teacher: str, student: str, store: str, ks: str, max_samples: int, json_path: str | None) -> None:
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in (teacher, student)]
    sums: dict[int, dict[str, float]] = {int(k): {} for k in ks.split(",")}
    positions = 0
    for index, sample in enumerate(Store(store)):
        if index >= max_samples:
            break
        mask = torch.from_numpy(sample["loss_mask"])
        ids = torch.from_numpy(sample["input_ids"][:-1].astype("int64"))[None]
        with torch.inference_mode():
            logp, logq = (torch.log_softmax(m(ids).logits[0][mask].double(), -1) for m in models)
        positions += int(mask.sum())
        for k, acc in sums.items():
            for name, value in bias_at(logp, logq, k).items():
                acc[name] = acc.get(name, 0.0) + float(value.sum())
    rows = []
    for k, acc in sums.items():
        mean = {name: value / positions for name, value in acc.items()}
        rows.append({"k": k, "tail_mass": mean["tail_mass"], "full_kl": mean["full_kl"],
                     "hidden_kl": mean["hidden_kl"], "hidden_share": mean["hidden_kl"] / mean["full_kl"],
                     "grad_bias": mean["grad_bias"]})
    click.echo(f"{positions} held-out positions; teacher {teacher}, student {student}; {platform.processor() or ''}")
    click.echo(f"{'k':>5} {'tail mass':>10} {'full KL':>9} {'hidden KL':>10} {'hidden share':>13} {'grad bias':>10}")
    for r in rows:
        click.echo(f"{r['k']:>5} {r['tail_mass']:>10.3f} {r['full_kl']:>9.3f} {r['hidden_kl']:>10.3f} "
                   f"{r['hidden_share']:>12.1%} {r['grad_bias']:>9.1%}")
    if json_path:
        Path(json_path).write_text(json.dumps({"positions": positions, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
