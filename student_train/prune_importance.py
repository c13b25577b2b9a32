"""Importance of a decoder's blocks, attention heads and FFN channels, measured on a calibration slice of a store.

Part of `student-init` (student_train/prune_cli.py): these scores decide what `student_train.prune` keeps. The
calibration slice is `samples` rows spread evenly over a store written by `teacher-cache build` (its tokens,
attention and loss masks; the teacher's tokenizer is checked against the store's). The loss is the CE of the
model's next-token predictions at the store's trained positions (`loss_mask`), computed a chunk of positions at a
time by `student_train.losses.distillation_loss`, so no [batch, time, vocab] logits exist.

- Block: how much that loss rises when the block alone is skipped (its output replaced by its input). This measures
  what is lost directly, first and last blocks included, where a similarity of the block's input and output
  (ShortGPT's block influence) only approximates it; it costs one forward pass of the slice per block. Each block is
  scored alone: the cost of dropping several together is not measured.
- Head: the first-order (Taylor) estimate of the loss change when the head is masked (Michel et al., 2019): a mask
  xi of ones multiplies each head's output before the output projection, and the score is the mean over samples of
  |dL/dxi| = |sum over the sample's positions and the head's D values of gradient x activation|. A head whose output
  projection is zero scores exactly 0. Only activations carry gradients; the weights get none.
- FFN channel: the mean |activation| at the input of the FFN's output projection, over real tokens: act(gate) * up
  for gated MLPs, act(c_fc) for GPT-2. A channel whose up (or c_fc) weights are zero scores exactly 0.

Legend: B samples in a batch, T positions, N query heads, D head size, I FFN width, L blocks.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from storage.reader import Store
from student_train.loss_config import LossConfig
from student_train.losses import distillation_loss
from student_train.prune import Family, blocks, shape_of
from student_train.student import compatibility_problems

log = logging.getLogger(__name__)

CE_ONLY = LossConfig(weights={"ce": 1.0}, chunk_positions=256)
Batch = dict[str, torch.Tensor]


@dataclass
class Scores:
    """Per block: the importance of each query head ([N] each) and of each FFN channel ([I] each); None when not
    measured."""

    heads: list[list[float]] | None
    channels: list[list[float]] | None


def calibration_batches(store_url: str, samples: int, batch_size: int, tokenizer, vocab_size: int,
                        teacher: str) -> list[Batch]:
    """`samples` rows spread evenly over the store (all of it if smaller), as batches of `batch_size` rows:
    input_ids [B, T + 1], attention_mask [B, T + 1], loss_mask [B, T].

    Raises:
        ValueError: the teacher's tokenizer or vocabulary differs from the store's.
    """
    store = Store(store_url)
    problems = compatibility_problems(tokenizer, vocab_size, store.manifest, teacher)
    if problems:
        raise ValueError("--store: its tokens are not the teacher's:\n" + "\n".join(problems))
    rows = np.unique(np.linspace(0, len(store) - 1, min(samples, len(store))).round().astype(np.int64))
    records = [_read(store, int(row)) for row in rows]
    batches = []
    for start in range(0, len(records), batch_size):
        part = records[start:start + batch_size]
        batches.append({name: torch.from_numpy(np.stack([record[name] for record in part]))
                        for name in part[0]})
    log.info("calibration: %d samples of %s, %d trained positions", len(records), store_url,
             sum(int(batch["loss_mask"].sum()) for batch in batches))
    return batches


def _read(store: Store, index: int) -> dict[str, np.ndarray]:
    shard, row = store.locate(index)
    reader = store.shards[shard]
    return {"input_ids": reader.array("input_ids")[row].astype(np.int64),
            "attention_mask": reader.array("attention_mask")[row].astype(bool),
            "loss_mask": reader.array("loss_mask")[row].astype(bool)}


def _loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(mean CE over the batch's trained positions, their number)."""
    device = next(model.parameters()).device
    batch = {name: value.to(device) for name, value in batch.items()}
    hidden_BTH = model.base_model(input_ids=batch["input_ids"][:, :-1],
                                  attention_mask=batch["attention_mask"][:, :-1].long(), use_cache=False)
    loss, metrics = distillation_loss(hidden_BTH.last_hidden_state, model.get_output_embeddings(), batch, CE_ONLY)
    return loss, int(metrics["tokens"])


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Batch]) -> float:
    """CE over every trained position of the batches."""
    total = count = 0
    for batch in batches:
        loss, tokens = _loss(model, batch)
        total, count = total + float(loss) * tokens, count + tokens
    return total / max(count, 1)


@contextmanager
def skipped(block: nn.Module):
    """Within the context, `block` passes its input hidden states through unchanged."""
    def pass_input(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(pass_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def block_importance(model: nn.Module, batches: list[Batch]) -> list[float]:
    """For each block, the rise of the calibration CE when it alone is skipped."""
    model.eval()
    stack = blocks(model)
    base = mean_loss(model, batches)
    scores = []
    for block in tqdm(stack, desc="block importance", unit="block", dynamic_ncols=True):
        with skipped(block):
            scores.append(mean_loss(model, batches) - base)
    log.info("block importance (CE rise when skipped, base %.4f): %s", base, ", ".join(f"{s:.4f}" for s in scores))
    return scores


def head_and_channel_importance(model: nn.Module, family: Family, batches: list[Batch], *, heads: bool,
                                channels: bool) -> Scores:
    """Importance of every block's query heads (`heads`) and FFN channels (`channels`); see the module docstring."""
    model.eval()
    shape = shape_of(model, family)
    stack = blocks(model)
    head_sums_LN = torch.zeros(len(stack), shape.num_heads, dtype=torch.float64)
    channel_sums_LI = torch.zeros(len(stack), shape.ffn_width, dtype=torch.float64)
    masks: list[tuple[int, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}  # the real positions of the batch being run, "real_BT"

    def mask_heads(layer: int):
        def hook(module, args):
            act_BTX = args[0]
            b, t, _ = act_BTX.shape
            xi_BN = torch.ones(b, shape.num_heads, dtype=act_BTX.dtype, device=act_BTX.device, requires_grad=True)
            masks.append((layer, xi_BN))
            masked_BTX = (act_BTX.view(b, t, shape.num_heads, shape.head_dim) * xi_BN[:, None, :, None]).flatten(2)
            return (masked_BTX,)
        return hook

    def sum_channels(layer: int):
        def hook(module, args):
            act_BTI = args[0].detach().abs().double()
            channel_sums_LI[layer] += (act_BTI * current["real_BT"][..., None]).sum((0, 1)).cpu()
        return hook

    handles = []
    for layer, block in enumerate(stack):
        if heads:
            handles.append(block.get_submodule(family.attention_out).register_forward_pre_hook(mask_heads(layer)))
        if channels:
            handles.append(block.get_submodule(family.ffn_out).register_forward_pre_hook(sum_channels(layer)))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)  # gradients reach the head masks through the activations only
    samples = real_tokens = 0
    try:
        for batch in tqdm(batches, desc="head/FFN importance", unit="batch", dynamic_ncols=True):
            real_BT = batch["attention_mask"][:, :-1]
            current["real_BT"] = real_BT.to(next(model.parameters()).device)
            with torch.set_grad_enabled(heads):
                loss, _ = _loss(model, batch)
            if heads:
                loss.backward()
                for layer, xi_BN in masks:
                    head_sums_LN[layer] += xi_BN.grad.abs().double().sum(0).cpu()
                masks.clear()
            samples, real_tokens = samples + real_BT.shape[0], real_tokens + int(real_BT.sum())
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return Scores(heads=(head_sums_LN / max(samples, 1)).tolist() if heads else None,
                  channels=(channel_sums_LI / max(real_tokens, 1)).tolist() if channels else None)
