"""Liger-kernel's fused linear cross-entropy for a CE-only loss on CUDA, and the choice between it and the torch path.

Sits under `student_train.losses`: when a run's loss is CE alone, `distillation_loss` hands the trained positions'
hidden states and the head to Liger's Triton kernel, which applies the head and computes the loss and both
gradients in one pass over chunks of its own, with no autograd graph through the logits and no recomputation in
backward. The torch path (the chunks of `losses`, fused or checkpointed) is the reference; both compute

    CE = sum over the trained positions (loss_mask true) of -log softmax(h W^T + b)[true next token] / their number

in fp32 from the same hidden states and head: no temperature, label smoothing, logit softcap or z-loss (our CE has
none of them), so the loss and its gradients agree to float tolerance. Liger gets the trained positions only, as
the torch path's chunks do, with reduction="sum", and the division by their number is `distillation_loss`'s, as for
the torch path. No position is passed only to be ignored, so Liger's ignore_index (-100) never matters; its "mean"
would divide by the same number, the count of targets that are not ignore_index.

Why CE-only: Liger's distillation losses (LigerFusedLinearJSD, ...) take the teacher's dense hidden states and
head, and a store keeps sparse targets (top-k + tail, or draws), so they do not apply. With a divergence in the
mix, the torch path builds each chunk's [C, V] logits anyway and the CE term is one log-sum-exp and one gather over
them; a fused CE would apply the head a second time over every position, costing more than it saves.

Legend: P trained positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from student_train.loss_config import LossConfig

log = logging.getLogger(__name__)

FUSED_CE = ("auto", "liger", "torch")  # the choices of `--fused-ce`


def use_liger(choice: str, device: torch.device, loss_config: LossConfig) -> bool:
    """Whether the run's CE comes from Liger's fused kernel; logs the path taken (call once per run).

    Liger applies when the device is CUDA, liger_kernel imports, and the loss is CE alone (`loss_config` has no
    divergence with weight).

    Args:
        choice: one of FUSED_CE: "torch" never uses Liger; "auto" uses it where it applies; "liger" requires it.
        device: the device the loss runs on.
        loss_config: the run's loss.

    Raises:
        ValueError: `choice` is "liger" and Liger does not apply; the message says why.
    """
    assert choice in FUSED_CE, f"TrainConfig checks --fused-ce, got {choice!r}"
    if choice == "torch":
        log.info("cross-entropy: torch path (--fused-ce torch)")
        return False
    reasons = _reasons_not_to_apply(device, loss_config)
    if not reasons:
        log.info("cross-entropy: Liger-kernel's fused linear cross-entropy (--fused-ce %s)", choice)
        return True
    if choice == "liger":
        raise ValueError(f"--fused-ce liger: Liger-kernel's fused cross-entropy cannot be used here: "
                         f"{'; '.join(reasons)}. Use --fused-ce auto (falls back to the torch path, same numbers) "
                         "or torch.")
    log.info("cross-entropy: torch path (Liger's fused kernel not used: %s)", "; ".join(reasons))
    return False


def _reasons_not_to_apply(device: torch.device, loss_config: LossConfig) -> list[str]:
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it runs on CUDA only and the device is {device}")
    import_error = _import_error()
    if import_error:
        reasons.append(import_error)
    if loss_config.kd_weights:
        reasons.append(f"it computes CE alone and the loss also has {', '.join(loss_config.kd_weights)} (whose "
                       "chunks give CE at almost no cost)")
    return reasons


@functools.cache  # a failed import may half-succeed when tried again; the first answer stands
def _import_error() -> str | None:
    """None when Liger's functional API imports, else why not and what to install."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "liger_kernel":
            return "liger-kernel is not installed: pip install liger-kernel (it needs Triton and a CUDA GPU)"
        return f"liger_kernel does not import ({exc}): pip install liger-kernel with its dependencies"
    except ImportError as exc:  # e.g. a release older than the installed transformers
        return f"liger_kernel does not import ({exc}): pip install --upgrade liger-kernel"
    return None


def liger_ce_sum(hidden_PH: torch.Tensor, head: nn.Linear, true_P: torch.Tensor) -> torch.Tensor:
    """Summed CE over P > 0 positions (fp32 scalar), from Liger's kernel; gradients to `hidden_PH` and the head.

    The kernel computes the gradients in its forward and holds them (a [P, H] and a [V, H] buffer, the size of the
    head's own gradient) until backward. It needs at least one position (it divides by the chunk count).
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    assert hidden_PH.shape[0] > 0, "Liger's kernel cannot take 0 positions; the torch path handles them"
    return liger_fused_linear_cross_entropy(input=hidden_PH, weight=head.weight, target=true_P, bias=head.bias,
                                            reduction="sum")
