"""Liger-kernel's fused cross-entropy: when a run uses it (on any machine), and that it gives the torch path's loss and
gradients (where Liger's Triton kernels can run).

The dispatch tests call the real `use_liger` with real devices and the real import of liger_kernel: CPU runs and
loss mixes take the torch path, and `--fused-ce liger` where Liger cannot run is an error that says why and how to
fix it. The numerical tests need liger_kernel and either a CUDA GPU or Triton's interpreter (TRITON_INTERPRET=1,
which runs the kernels on CPU tensors, slowly); without them they skip. liger-kernel is not a dev dependency: it
needs Triton and, for training, CUDA.

Legend: B batch, L positions per row, H hidden size, V vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from torch import nn

from student_train.cli import main
from student_train.config import TrainConfig
from student_train.liger import use_liger
from student_train.loss_config import LossConfig
from student_train.losses import distillation_loss

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_CUDA = torch.cuda.is_available()
# Where Liger's kernels run: a CUDA GPU, else Triton's interpreter on CPU tensors when it is switched on.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (HAS_LIGER and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs liger-kernel (pip install liger-kernel) and a CUDA GPU, or TRITON_INTERPRET=1 on CPU")
needs_cuda_liger = pytest.mark.skipif(not (HAS_LIGER and HAS_CUDA),
                                      reason="needs a CUDA GPU and liger-kernel (pip install liger-kernel)")

CE_ONLY = LossConfig(weights={"ce": 1.0})
MIX = LossConfig(weights={"forward_kl": 0.9, "ce": 0.1})
CUDA = torch.device("cuda")  # a device object needs no GPU; only running on it does


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("liger-store"), llama_dir, corpus_texts[:24])


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("student-config"), llama_dir)


# --- Which path a run takes --------------------------------------------------------------------------------------


def test_cpu_takes_the_torch_path_and_refuses_liger(caplog):
    with caplog.at_level(logging.INFO, logger="student_train.liger"):
        assert use_liger("auto", torch.device("cpu"), CE_ONLY) is False
    assert "torch path" in caplog.text and "CUDA" in caplog.text
    with pytest.raises(ValueError, match="--fused-ce liger.*CUDA only and the device is cpu"):
        use_liger("liger", torch.device("cpu"), CE_ONLY)


def test_torch_choice_never_uses_liger():
    assert use_liger("torch", CUDA, CE_ONLY) is False


def test_a_loss_with_divergences_takes_the_torch_path():
    assert use_liger("auto", CUDA, MIX) is False
    with pytest.raises(ValueError, match="also has forward_kl"):
        use_liger("liger", CUDA, MIX)
    with pytest.raises(ValueError, match="fused_ce: .* also has forward_kl"):
        LossConfig(weights={"forward_kl": 0.9, "ce": 0.1}, fused_ce=True)


@pytest.mark.skipif(HAS_LIGER, reason="liger-kernel is installed: this checks the machines without it")
def test_missing_liger_falls_back_under_auto_and_is_an_error_under_liger():
    assert use_liger("auto", CUDA, CE_ONLY) is False
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        use_liger("liger", CUDA, CE_ONLY)


def test_train_config_checks_the_choice():
    with pytest.raises(ValueError, match="--fused-ce: 'fast' is not one of auto, liger, torch"):
        TrainConfig(store="s", student="m", output="o", fused_ce="fast")


def test_cli_liger_where_it_cannot_run_is_a_usage_error(tmp_path, store, student_config):
    result = CliRunner().invoke(main, ["--store", str(store), "--student", str(student_config), "--output",
                                       str(tmp_path / "run"), "--loss", "ce=1", "--device", "cpu",
                                       "--fused-ce", "liger"])
    assert result.exit_code == 2, result.output
    assert "--fused-ce liger" in result.output and "CUDA" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_auto_on_cpu_trains_on_the_torch_path(tmp_path, store, student_config):
    result = CliRunner().invoke(main, ["--store", str(store), "--student", str(student_config), "--output",
                                       str(tmp_path / "run"), "--loss", "ce=1", "--device", "cpu", "--max-steps",
                                       "1", "--batch-size", "4", "--eval-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["fused_ce"] == "auto"


# --- Same numbers -------------------------------------------------------------------------------------------------


def _case(seed: int, *, bias: bool, all_masked: bool = False):
    """Hidden states [B, L, H], a head H -> V and a CE batch with a loss mask, on KERNEL_DEVICE, in fp32."""
    B, L, H, V = 3, 101, 64, 1003  # P ~ 230 positions: Liger splits them into several chunks of its own
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=bias).to(KERNEL_DEVICE)
    hidden = torch.randn(B, L, H, generator=gen).to(KERNEL_DEVICE).requires_grad_()
    mask = torch.rand(B, L, generator=gen) < 0.75
    if all_masked:
        mask[:] = False
    batch = {"loss_mask": mask, "input_ids": torch.randint(V, (B, L + 1), generator=gen)}
    return hidden, head, batch


def _loss_and_grads(hidden, head, batch, config):
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    loss, metrics = distillation_loss(hidden, head, batch, config)
    loss.backward()
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return loss.detach(), metrics, [g.clone() for g in grads]


@needs_kernels
@pytest.mark.parametrize(("ce_weight", "bias"), [(1.0, False), (0.3, True)])
def test_liger_equals_the_torch_path(ce_weight, bias):
    """Loss, metrics and the gradients w.r.t. the hidden states and the head, against the chunked torch path."""
    hidden, head, batch = _case(0, bias=bias)
    torch_path = LossConfig(weights={"ce": ce_weight}, chunk_positions=64)
    liger_path = LossConfig(weights={"ce": ce_weight}, chunk_positions=64, fused_ce=True)
    loss, metrics, grads = _loss_and_grads(hidden, head, batch, torch_path)
    fused_loss, fused_metrics, fused_grads = _loss_and_grads(hidden, head, batch, liger_path)

    assert fused_loss.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert fused_metrics.keys() == metrics.keys()
    for name in metrics:
        torch.testing.assert_close(fused_metrics[name].cpu(), metrics[name].cpu(), rtol=1e-5, atol=1e-6)
    for fused, reference in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-7)
    assert fused_grads[0][~batch["loss_mask"].to(KERNEL_DEVICE)].abs().max() == 0  # untrained positions: no gradient


@needs_kernels
def test_liger_path_with_no_trained_position_is_zero_with_a_graph():
    hidden, head, batch = _case(1, bias=False, all_masked=True)
    loss, metrics, grads = _loss_and_grads(hidden, head, batch, LossConfig(weights={"ce": 1.0}, fused_ce=True))
    assert float(loss) == 0.0 and int(metrics["tokens"]) == 0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


@needs_cuda_liger
def test_auto_on_cuda_with_liger_uses_it():
    assert use_liger("auto", CUDA, CE_ONLY) is True


@needs_cuda_liger
@pytest.mark.slow
def test_training_through_the_cli_gives_the_same_losses_on_both_paths(tmp_path, store, student_config):
    """A few CE-only steps on CUDA (bf16 autocast, as users train), once per path, from the same init and data."""
    losses = {}
    for path in ("liger", "torch"):
        output = tmp_path / path
        result = CliRunner().invoke(main, ["--store", str(store), "--student", str(student_config), "--output",
                                           str(output), "--loss", "ce=1", "--device", "cuda", "--fused-ce", path,
                                           "--max-steps", "4", "--batch-size", "4", "--eval-fraction", "0.2",
                                           "--log-every", "1", "--lr", "1e-2"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        losses[path] = [record["ce"] for record in records if "eval" not in record]
    assert len(losses["liger"]) == 4
    # Step 1 differs only in how the loss is computed; later steps also carry bf16 rounding of slightly different
    # weights.
    assert losses["liger"][0] == pytest.approx(losses["torch"][0], rel=1e-5)
    assert losses["liger"] == pytest.approx(losses["torch"], rel=2e-3)
