"""`benchmarks/hybrid_vllm_bias.py` on a tiny teacher and student: every figure against its definition.

The brute force here runs both models' own forward over the store's samples and builds, per position, the true
tail-conditional distribution t and its truncation t~ (exact up to rank n, the residual spread like the student
beyond) as whole vectors over the vocabulary, found with `torch.topk` rather than the script's sort and suffix sums,
and takes KL(t || t~), the L1 gradient bias and the residual share from their definitions.

Legend: P trained positions, V vocabulary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_benchmark, make_llama, make_small_store
from transformers import AutoModelForCausalLM

from storage.reader import Store

K, NS = 8, (16, 256, 32000)  # n = V: nothing beyond, every figure 0


hybrid_vllm_bias = load_benchmark("hybrid_vllm_bias")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, corpus_texts):
    root = tmp_path_factory.mktemp("hybrid-bias")
    store = make_small_store(root, llama_dir, corpus_texts[:10], max_samples=3, targets=("topk",))
    student = make_llama(root / "student", seed=1)
    return store, student, root


@pytest.fixture(scope="module")
def run(setup, llama_dir):
    store, student, root = setup
    args = ["--teacher", str(llama_dir), "--student", str(student), "--store", str(store), "--k", str(K),
            "--n", ",".join(map(str, NS)), "--json", str(root / "bias.json")]
    result = CliRunner().invoke(hybrid_vllm_bias.main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((root / "bias.json").read_text()), result.output


def _brute_force(setup, llama_dir) -> dict[int, dict[str, float]]:
    """Mean over the trained positions of each figure, per n, from whole-vocabulary vectors."""
    store, student, _ = setup
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in (llama_dir, student)]
    data = Store(store).read_rows(0, len(Store(store)))
    with torch.inference_mode():
        logp_PV, logq_PV = (torch.log_softmax(m(input_ids=torch.from_numpy(data["input_ids"][:, :-1].astype(np.int64)),
                                                attention_mask=torch.from_numpy(data["attention_mask"][:, :-1]).long())
                                              .logits[torch.from_numpy(data["loss_mask"])].double(), -1)
                            for m in models)
    p_PV, q_PV = logp_PV.exp(), logq_PV.exp()
    V = p_PV.shape[1]

    def outside(n: int) -> torch.Tensor:  # bool [P, V]: ids ranked beyond n by the teacher
        return torch.ones_like(p_PV, dtype=torch.bool).scatter(1, p_PV.topk(n, -1).indices, False)

    tail_PV = outside(K)
    m_P = (p_PV * tail_PV).sum(-1)
    t_PV = torch.where(tail_PV, p_PV, 0.0) / m_P[:, None]
    out = {}
    for n in (K, *NS):
        beyond_PV = outside(n) if n < V else torch.zeros_like(tail_PV)
        r_P = (p_PV * beyond_PV).sum(-1)
        student_beyond_P = (q_PV * beyond_PV).sum(-1)
        p_tilde_PV = torch.where(beyond_PV, r_P[:, None] * q_PV / student_beyond_P[:, None].clamp_min(1e-300), p_PV)
        t_tilde_PV = torch.where(tail_PV, p_tilde_PV, 0.0) / m_P[:, None]
        kl_P = torch.where(t_PV > 0, t_PV * (t_PV.log() - t_tilde_PV.log()), 0.0).sum(-1)
        uniform_PV = torch.where(beyond_PV, r_P[:, None] / max(V - n, 1), p_PV)
        t_uniform_PV = torch.where(tail_PV, uniform_PV, 0.0) / m_P[:, None]
        kl_uniform_P = torch.where(t_PV > 0, t_PV * (t_PV.log() - t_uniform_PV.log()), 0.0).sum(-1)
        out[n] = {"residual_share": (r_P / m_P).mean(), "tail_kl": kl_P.mean(), "tail_kl_uniform": kl_uniform_P.mean(),
                  "grad_bias": ((p_tilde_PV - p_PV).abs().sum(-1) / (q_PV - p_PV).abs().sum(-1)).mean(),
                  "tail_mass": m_P.mean(), "positions": len(m_P)}
    return out


def test_every_figure_matches_its_definition(run, setup, llama_dir):
    report, output = run
    want = _brute_force(setup, llama_dir)
    assert [(row["k"], row["n"]) for row in report["rows"]] == [(K, n) for n in (K, *NS)]
    assert report["positions"] == want[K]["positions"] and report["machine"]["cpu_cores"]
    # The script runs one sample at a time, the brute force all at once: equal on the CPU this was written on, but
    # other batch shapes may pick other kernels and so other float32 rounding (log-probs measured to differ by up to
    # 1e-6 relative between such forwards). 1e-4 allows for it; a figure computed wrongly is off by far more.
    for row in report["rows"]:
        for name in ("residual_share", "tail_kl", "tail_kl_uniform", "grad_bias", "tail_mass"):
            assert row[name] == pytest.approx(float(want[row["n"]][name]), rel=1e-4, abs=1e-9), (row["n"], name)
    assert report["rows"][0]["residual_share"] == pytest.approx(1.0)  # n = k: the whole tail in one bucket
    shares = [row["residual_share"] for row in report["rows"]]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0 and report["rows"][-1]["grad_bias"] == 0
    assert "(one tail bucket)" in output and f"{report['positions']} trained positions" in output


@pytest.mark.parametrize(("ks", "ns", "message"), [("8", "8", "each n must exceed every k"),
                                                   ("8", "x", "comma-separated integers"),
                                                   ("8", "40000", "exceeds the teacher's vocabulary")])
def test_bad_k_and_n_are_refused(setup, llama_dir, ks, ns, message):
    store, student, _ = setup
    result = CliRunner().invoke(hybrid_vllm_bias.main, ["--teacher", str(llama_dir), "--student", str(student),
                                                        "--store", str(store), "--k", ks, "--n", ns])
    assert result.exit_code == 2 and message in result.output, result.output


def test_help():
    result = CliRunner().invoke(hybrid_vllm_bias.main, ["--help"])
    assert result.exit_code == 0 and "--n" in result.output and "max_logprobs" in result.output
