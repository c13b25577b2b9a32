"""`--top-k`: the k most probable of a store's top-K targets train as a store built with k would.

The reference derives both records from one dense teacher distribution, the way the build does (torch.topk, ids
ascending, tail = log of the mass outside the ids), once with K ids and once with k; the loss on the K-record with
`top_k=k` must equal the loss on the k-record, values and gradients.

Legend: B batch, L positions, H hidden size, V vocabulary, K stored top-k, k kept.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from torch import nn

from student_train.cli import main
from student_train.config import TrainConfig
from student_train.loss_config import LossConfig
from student_train.losses import distillation_loss

B, L, H, V, K = 2, 9, 16, 97, 12


def records(teacher_BLV: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    ids = teacher_BLV.topk(k, -1).indices.sort(-1).values
    return {"topk_ids": ids, "topk_logprobs": teacher_BLV.gather(-1, ids).float(),
            "tail_logmass": teacher_BLV.scatter(-1, ids, -math.inf).logsumexp(-1).float()}


@pytest.mark.parametrize("targets,temperature", [("topk_tail", 1.0), ("topk_tail", 2.0), ("topk_renorm", 1.0),
                                                 ("topk_renorm", 0.5), ("topk_residual", 1.0),
                                                 ("topk_residual", 2.0)])
@pytest.mark.parametrize("k", [1, 5, K])
def test_top_k_of_a_store_is_a_store_of_k(targets, temperature, k):
    gen = torch.Generator().manual_seed(k)
    torch.manual_seed(k)
    head = nn.Linear(H, V)
    hidden = torch.randn(B, L, H, generator=gen, requires_grad=True)
    teacher = F.log_softmax(2.5 * torch.randn(B, L, V, generator=gen, dtype=torch.float64), -1)
    base = {"loss_mask": torch.rand(B, L, generator=gen) < 0.8,
            "input_ids": torch.randint(V, (B, L + 1), generator=gen)}
    weights = {"forward_kl": 0.6, "jsd": 0.3, "ce": 0.1}

    def loss_and_grads(batch, top_k):
        config = LossConfig(weights=weights, targets=targets, temperature=temperature, chunk_positions=5, top_k=top_k)
        loss, metrics = distillation_loss(hidden, head, batch, config)
        return loss, metrics, torch.autograd.grad(loss, [hidden, *head.parameters()])

    got, got_metrics, got_grads = loss_and_grads(base | records(teacher, K), k)
    want, want_metrics, want_grads = loss_and_grads(base | records(teacher, k), None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_metrics, want_metrics, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_top_k_needs_top_k_targets():
    with pytest.raises(ValueError, match="top_k: 4 .* the targets are sampled"):
        LossConfig(targets="sampled", top_k=4)
    with pytest.raises(ValueError, match="top_k: 0"):
        LossConfig(top_k=0)
    with pytest.raises(ValueError, match="top_k: 4 .* the targets are sampled"):
        TrainConfig(store="s", student="t", output="o", targets_from="sampled", top_k=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("top-k-store"), llama_dir, corpus_texts[:12])


def test_cli_top_k(tmp_path, store, llama_dir):
    student = make_student_config(tmp_path / "student", llama_dir)

    def run(*extra: str):
        return CliRunner().invoke(main, ["--store", str(store), "--student", str(student), "--output",
                                         str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
                                         "--eval-fraction", "0.2", "--device", "cpu", *extra])

    result = run("--top-k", "16")
    assert result.exit_code == 2 and "holds the top-8 ids" in result.output, result.output
    result = run("--top-k", "4", "--targets-from", "topk_renorm")
    assert result.exit_code == 0, result.output
    assert "top_k: 4" in (tmp_path / "run" / "resolved_config.yaml").read_text()
