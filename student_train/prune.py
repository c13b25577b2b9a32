"""Structured pruning of a decoder's attention heads and FFN channels, by surgery on its state dict.

Part of `student-init` (student_train/prune_cli.py), after layer dropping (`student_train.init_student.select_layers`)
and the importance scores of `student_train.prune_importance`: `choose_heads` and `top_channels` turn scores into the
units to keep, and `prune` slices every block's weights to them and loads the result into a fresh model of the
teacher's class built from the shrunk config, so what is returned saves and loads like any model of its class.

A standard HF config holds one head count and one FFN width for every layer, so every layer keeps the same number
of heads and channels (each layer its own choice of them). Grouped-query attention stays valid by one of two
rules (`choose_heads`): keep every KV group and, in each, its best query heads; or keep the best whole KV groups
(their K/V heads and all their query heads). Multi-head attention is the second rule with one head per group.

Families (`FAMILIES`): Llama-like blocks (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`; Llama, Mistral,
Qwen2 with its q/k/v biases, Qwen3 with its per-head q/k norms) prune heads and FFN channels; GPT-2 (Conv1D
weights, fused `c_attn`) prunes FFN channels only, as its head size is tied to n_embd / n_head.

Legend: N query heads, G KV heads (groups), Q = N / G query heads per group, D head size, I FFN width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from student_train.init_student import layer_stack

Slices = tuple[tuple[str, int], ...]  # (parameter name in a block, the dimension that holds one slice per unit)


@dataclass(frozen=True)
class Family:
    """Where a family of architectures keeps its heads and FFN channels.

    Attributes:
        name: the family, for messages.
        model_types: the config `model_type`s it covers.
        attention_out: the module, in a block, whose input is the heads' concatenated outputs.
        ffn_out: the module, in a block, whose input is the FFN's activations (one per channel).
        query: parameters with one slice of D per query head (missing ones, e.g. absent biases, are skipped).
        kv: parameters with one slice of D per KV head.
        ffn: parameters with one slice per FFN channel.
        ffn_width: the config attribute of the FFN width.
        conv1d: weights are stored [in, out] (GPT-2's Conv1D), not [out, in] as nn.Linear's.
        no_heads: why heads cannot be pruned in this family; None when they can.
    """

    name: str
    model_types: tuple[str, ...]
    attention_out: str
    ffn_out: str
    query: Slices
    kv: Slices
    ffn: Slices
    ffn_width: str
    conv1d: bool = False
    no_heads: str | None = None


LLAMA_LIKE = Family(
    name="Llama-like", model_types=("llama", "mistral", "qwen2", "qwen3"),
    attention_out="self_attn.o_proj", ffn_out="mlp.down_proj",
    query=(("self_attn.q_proj.weight", 0), ("self_attn.q_proj.bias", 0), ("self_attn.o_proj.weight", 1)),
    kv=(("self_attn.k_proj.weight", 0), ("self_attn.k_proj.bias", 0), ("self_attn.v_proj.weight", 0),
        ("self_attn.v_proj.bias", 0)),
    ffn=(("mlp.gate_proj.weight", 0), ("mlp.gate_proj.bias", 0), ("mlp.up_proj.weight", 0), ("mlp.up_proj.bias", 0),
         ("mlp.down_proj.weight", 1)),
    ffn_width="intermediate_size",
)
GPT2 = Family(
    name="GPT-2", model_types=("gpt2",), attention_out="attn.c_proj", ffn_out="mlp.c_proj", query=(), kv=(),
    ffn=(("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 0)),
    ffn_width="n_inner", conv1d=True,
    no_heads="GPT-2 ties the head size to n_embd / n_head, so a head cannot be removed without changing the model's "
             "width; prune its layers (--keep-layers, --layers) and FFN (--ffn) instead",
)
FAMILIES = (LLAMA_LIKE, GPT2)


@dataclass(frozen=True)
class Shape:
    """The attention and FFN sizes of a model's blocks (the same in every block)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_width: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def find_family(model: nn.Module) -> Family:
    """The family of `model`, from its config's model_type.

    Raises:
        ValueError: an architecture no family covers; the message names those supported.
    """
    model_type = model.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES)
    raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) is not supported for head or FFN pruning; "
                     f"supported: {supported}. Its layers alone can still be dropped (--keep-layers, --layers).")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's blocks (see `student_train.init_student.layer_stack`)."""
    return model.get_submodule(layer_stack(model))


def shape_of(model: nn.Module, family: Family) -> Shape:
    """Head counts, head size and FFN width of `model`, read from its config and first block."""
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    block = blocks(model)[0]
    attention_in = block.get_submodule(family.attention_out).weight
    ffn_in = block.get_submodule(family.ffn_out).weight
    inputs = 0 if family.conv1d else 1  # N * D and I are the output projections' inputs
    return Shape(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=attention_in.shape[inputs] // num_heads,
                 ffn_width=ffn_in.shape[inputs])


def head_counts(shape: Shape) -> list[int]:
    """The query-head counts a pruned model may keep: multiples of G (every group kept) or of Q (whole groups)."""
    counts = set(range(shape.num_kv_heads, shape.num_heads + 1, shape.num_kv_heads))
    counts |= set(range(shape.heads_per_group, shape.num_heads + 1, shape.heads_per_group))
    return sorted(counts)


def check_head_count(shape: Shape, keep: int) -> None:
    """Raise unless `keep` query heads per layer leave every KV head with as many query heads (`head_counts`)."""
    if keep not in head_counts(shape):
        raise ValueError(
            f"heads: cannot keep {keep} of {shape.num_heads} query heads with {shape.num_kv_heads} KV heads "
            f"({shape.heads_per_group} query heads per KV head): every KV head must keep as many query heads. Keep "
            f"one of {', '.join(map(str, head_counts(shape)))} (or a fraction, which takes the nearest of these).")


def choose_heads(scores_N: Sequence[float], shape: Shape, keep: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) of one layer to keep, `keep` query heads in all, by importance (ties: lower index).

    `keep` a multiple of G: every KV group keeps its keep / G best query heads. Else, `keep` a multiple of Q: the
    keep / Q groups of highest summed importance are kept whole. Either way every group keeps as many query heads.

    Raises:
        ValueError: a count that neither rule gives (see `check_head_count`).
    """
    check_head_count(shape, keep)
    num_groups, per_group = shape.num_kv_heads, shape.heads_per_group
    scores_GQ = torch.tensor(scores_N, dtype=torch.float64).view(num_groups, per_group)
    if keep % num_groups == 0:
        kv = list(range(num_groups))
        order_GQ = scores_GQ.argsort(dim=1, descending=True, stable=True)[:, :keep // num_groups]
        query = sorted(g * per_group + int(q) for g in kv for q in order_GQ[g])
        return query, kv
    kv = sorted(scores_GQ.sum(1).argsort(descending=True, stable=True)[:keep // per_group].tolist())
    return [g * per_group + q for g in kv for q in range(per_group)], kv


def top_channels(scores_I: Sequence[float], keep: int) -> list[int]:
    """The `keep` FFN channels of highest importance, in their original order (ties: lower index)."""
    order = torch.tensor(scores_I, dtype=torch.float64).argsort(descending=True, stable=True)
    return sorted(order[:keep].tolist())


def prune(model: nn.Module, family: Family, *, query_heads: list[list[int]] | None = None,
          kv_heads: list[list[int]] | None = None, channels: list[list[int]] | None = None) -> nn.Module:
    """A new model of `model`'s class that keeps, in block l, the query heads `query_heads[l]`, KV heads
    `kv_heads[l]` and FFN channels `channels[l]` (None: all of them). `model` is left unchanged.

    Every block must keep as many heads of each kind and as many channels (`choose_heads`, `top_channels`). Kept
    weights are copied bit for bit, so keeping everything reproduces the model exactly.
    """
    shape = shape_of(model, family)
    stack = layer_stack(model)
    state = model.state_dict()
    for layer in range(len(blocks(model))):
        prefix = f"{stack}.{layer}."
        if query_heads is not None:
            _keep(state, prefix, family.query, query_heads[layer], shape.head_dim)
            _keep(state, prefix, family.kv, kv_heads[layer], shape.head_dim)
        if channels is not None:
            _keep(state, prefix, family.ffn, channels[layer], 1)
    config = copy.deepcopy(model.config)
    if query_heads is not None:
        config.num_attention_heads, config.num_key_value_heads = len(query_heads[0]), len(kv_heads[0])
        config.head_dim = shape.head_dim  # no longer hidden_size / num_attention_heads
    if channels is not None:
        setattr(config, family.ffn_width, len(channels[0]))
    device = next(model.parameters()).device
    with torch.device(device), no_init_weights():  # every weight is loaded below
        pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.tie_weights()  # no_init_weights also skipped the tying of a tied head to the embeddings
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


def _keep(state: dict[str, torch.Tensor], prefix: str, slices: Slices, units: list[int], size: int) -> None:
    """Keep, in each parameter of `slices`, the `size`-wide slices of `units` along its dimension."""
    index = (torch.tensor(units)[:, None] * size + torch.arange(size)).flatten()
    for name, dim in slices:
        key = prefix + name
        if key in state:
            state[key] = state[key].index_select(dim, index.to(state[key].device)).contiguous()
