"""What hybrid targets would lose on the vllm backend: tail draws cut at rank n, plus one residual bucket.

Hybrid targets (`--targets hybrid`, transformers backend) keep the top-k exact and draw N ids from the teacher's
tail-conditional distribution t(v) = p(v) / m over the ids outside the top-k (m the tail mass), so
exp(tail_logmass) * count / N is unbiased for p on the tail. vLLM returns only the n most probable ids of a position
(n bounded by its max_logprobs), so the only hybrid target it could offer draws from ranks k+1..n exactly and puts the
mass r beyond rank n into one residual bucket, which a loss can only spread like the student does (q / Q over the ids
beyond rank n, Q the student's mass there), as the existing vllm tail bucket is (n = k: `--targets topk,sampled` on
vllm). In expectation the student then learns p~, equal to p up to rank n and r * q(v) / Q beyond. This script
computes, exactly (no sampling noise) at every trained position of a store, for a real teacher and student:

  - residual share r / m: the share of the tail's draws that land in the bucket;
  - tail KL: KL(t || t~), t~ = p~ / m on the tail, the divergence of the truncated tail-conditional from the true one,
    = (r / m) KL(p_{>n} / r || q_{>n} / Q) (nats); with the residual spread uniformly instead of like the student,
    the student-free figure (r / m) KL(p_{>n} / r || uniform over V - n ids);
  - hidden share: r KL(p_{>n} / r || q_{>n} / Q) / KL(p || q), the part of the full forward KL the bucket hides;
  - gradient bias: |p~ - p|_1 / |q - p|_1, the bias of the expected forward-KL gradient on the student's logits
    relative to its size (0 for exact hybrid draws).

Means over positions (the hidden share: mean hidden KL over mean full KL). Rows with n = k are the single tail bucket
vLLM offers today.

    python benchmarks/hybrid_vllm_bias.py --teacher .demo/teacher --student .demo/student-ce \\
        --store .demo/cache-heldout [--k 16,64] [--n 128,256,1024] [--max-samples 32] [--json out.json]

(`make demo` builds those three.) Legend: P positions, V vocabulary, R ranks beyond n.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import click
import torch
from torch.special import xlogy
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine_info import machine  # noqa: E402
from storage.reader import Store  # noqa: E402
from student_train.eval_report import write_atomic  # noqa: E402

FIGURES = ("residual_share", "tail_kl", "tail_kl_uniform", "hidden_kl", "grad_bias")


def truncation_bias(logp_PV: torch.Tensor, logq_PV: torch.Tensor, ks: list[int],
                    ns: list[int]) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Per-position figures of the module docstring, keyed by (k, n), for every k of `ks` and every n of `ns` and
    n = k (k <= n <= V), from the teacher's and the student's log-probs (float64).

    Sorts once by the teacher's probability; the sums over the ranks beyond n are suffix sums, accumulated from the
    smallest probability up (no cancellation).
    """
    P, V = logp_PV.shape
    logp_PV, order_PV = logp_PV.sort(-1, descending=True)  # column j is rank j + 1
    logq_PV = logq_PV.gather(1, order_PV)
    p_PV, q_PV = logp_PV.exp(), logq_PV.exp()

    def beyond(x_PV: torch.Tensor) -> torch.Tensor:
        """[P, V + 1]: column j holds the sum of x over the ranks beyond j (columns j..V-1)."""
        return torch.cat([x_PV.flip(-1).cumsum(-1).flip(-1), x_PV.new_zeros(P, 1)], -1)

    mass, student_mass = beyond(p_PV), beyond(q_PV)
    kl_terms, entropy_terms = beyond(p_PV * (logp_PV - logq_PV)), beyond(p_PV * logp_PV)
    l1_P = (q_PV - p_PV).abs().sum(-1)
    per_n = {}
    for n in sorted({*ks, *ns}):
        r_P, big_q_P = mass[:, n], student_mass[:, n]
        # r KL(p_R / r || q_R / Q) = sum p_R (log p_R - log q_R) - r log r + r log Q over the ranks R beyond n.
        hidden_P = kl_terms[:, n] - xlogy(r_P, r_P) + xlogy(r_P, big_q_P)
        uniform_P = entropy_terms[:, n] - xlogy(r_P, r_P) + r_P * math.log(max(V - n, 1))
        spread_P = torch.where(big_q_P > 0, r_P / big_q_P, 0.0)  # p~ = r q / Q beyond rank n
        grad_bias_P = (spread_P[:, None] * q_PV[:, n:] - p_PV[:, n:]).abs().sum(-1) / l1_P
        per_n[n] = (r_P, hidden_P, uniform_P, grad_bias_P)
    out = {}
    for k in ks:
        m_P = mass[:, k]
        for n in [k, *ns]:
            r_P, hidden_P, uniform_P, grad_bias_P = per_n[n]
            out[k, n] = {"tail_mass": m_P, "residual_share": r_P / m_P, "tail_kl": hidden_P / m_P,
                         "tail_kl_uniform": uniform_P / m_P, "hidden_kl": hidden_P, "full_kl": kl_terms[:, 0],
                         "grad_bias": grad_bias_P}
    return out


def _ints(text: str, option: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}.", param_hint=option) from None


@click.command()
@click.option("--teacher", required=True, help="Teacher model directory.")
@click.option("--student", required=True, help="Student model directory (same tokenizer).")
@click.option("--store", required=True, help="A store of held-out samples (its input ids and loss masks are used).")
@click.option("--k", "ks", default="16,64", show_default=True, help="Top-k sizes of the hybrid head, comma-separated.")
@click.option("--n", "ns", default="128,256,1024", show_default=True,
              help="Log-probs vLLM would return per position (max_logprobs), comma-separated; each above every k.")
@click.option("--max-samples", type=int, default=32, show_default=True)
@click.option("--json", "json_path", help="Write the table as JSON here.")
def main(teacher: str, student: str, store: str, ks: str, ns: str, max_samples: int, json_path: str | None) -> None:
    k_list, n_list = _ints(ks, "--k"), _ints(ns, "--n")
    if not k_list or not n_list or k_list[0] < 1 or n_list[0] <= k_list[-1]:
        raise click.BadParameter(f"each n must exceed every k (k {k_list}, n {n_list}); rows with n = k, the single "
                                 "tail bucket, are added by themselves.", param_hint="--n")
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in (teacher, student)]
    vocab = models[0].config.vocab_size
    if n_list[-1] > vocab:
        raise click.BadParameter(f"n {n_list[-1]} exceeds the teacher's vocabulary of {vocab} ids.", param_hint="--n")
    sums = {(k, n): dict.fromkeys(("tail_mass", "full_kl", *FIGURES), 0.0) for k in k_list for n in [k, *n_list]}
    positions, began = 0, time.perf_counter()
    for index, sample in enumerate(Store(store)):
        if index >= max_samples:
            break
        mask = torch.from_numpy(sample["loss_mask"])
        ids = torch.from_numpy(sample["input_ids"][:-1].astype("int64"))[None]
        attention = torch.from_numpy(sample["attention_mask"][:-1]).long()[None]
        with torch.inference_mode():
            logp, logq = (torch.log_softmax(m(ids, attention_mask=attention).logits[0][mask].double(), -1)
                          for m in models)
        positions += int(mask.sum())
        for pair, figures in truncation_bias(logp, logq, k_list, n_list).items():
            for name in sums[pair]:
                sums[pair][name] += float(figures[name].sum())
    if not positions:
        raise click.ClickException(f"{store} holds no trained positions in its first {max_samples} samples.")
    rows = []
    for (k, n), acc in sums.items():
        mean = {name: value / positions for name, value in acc.items()}
        rows.append({"k": k, "n": n, **mean, "hidden_share": mean["hidden_kl"] / mean["full_kl"]})
    click.echo(f"{positions} trained positions of {store}; teacher {teacher}, student {student}; "
               f"{time.perf_counter() - began:.1f} s")
    click.echo(f"{'k':>5} {'n':>6} {'tail mass':>10} {'residual':>9} {'tail KL':>9} {'(uniform)':>10} "
               f"{'hidden share':>13} {'grad bias':>10}")
    for r in rows:
        click.echo(f"{r['k']:>5} {r['n']:>6} {r['tail_mass']:>10.3f} {r['residual_share']:>8.1%} {r['tail_kl']:>9.4f} "
                   f"{r['tail_kl_uniform']:>10.4f} {r['hidden_share']:>12.1%} {r['grad_bias']:>9.1%}"
                   + ("   (one tail bucket)" if r["n"] == r["k"] else ""))
    if json_path:
        report = {"teacher": teacher, "student": student, "store": store, "positions": positions,
                  "machine": machine(torch.device("cpu")), "rows": rows}
        write_atomic(Path(json_path), (json.dumps(report, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
