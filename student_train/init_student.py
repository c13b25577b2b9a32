"""Student init from the teacher: a smaller model of the teacher's class made of some of its layers.

The DistilBERT recipe: keep every other block of the teacher (or any chosen ones), with its embeddings, final norm
and output head, and distil into that. `select_layers` takes any loaded HF model whose blocks sit in one
`nn.ModuleList` of `config.num_hidden_layers` entries (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT,
Falcon, ...) and returns a new model of the same class; `student_train.student` calls it for
`student-train --init-from-teacher`, and a pruning tool can call it with the layers it ranks highest.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

SCALARS = (bool, int, float, str, type(None))


def every_other_layer(num_layers: int) -> list[int]:
    """Layers 0, 2, 4, ...: the default choice, as DistilBERT halved BERT."""
    return list(range(0, num_layers, 2))


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """`layers` as increasing indices of a model's `num_layers` blocks; negative indices count from the end.

    Raises:
        ValueError: no layer, an index out of range, or a layer named twice.
    """
    if not layers:
        raise ValueError("no layer to keep; name at least one.")
    outside = [i for i in layers if not -num_layers <= i < num_layers]
    if outside:
        raise ValueError(f"layer {', '.join(map(str, outside))} out of range: the model has {num_layers} layers, "
                         f"0..{num_layers - 1} (or -{num_layers}..-1 from the end).")
    resolved = [i % num_layers for i in layers]
    twice = sorted({i for i in resolved if resolved.count(i) > 1})
    if twice:
        raise ValueError(f"layer {', '.join(map(str, twice))} named twice in {', '.join(map(str, layers))} (negative "
                         "indices count from the end); name each layer once.")
    return sorted(resolved)


def layer_stack(model: nn.Module) -> str:
    """Name of the `nn.ModuleList` holding the model's `config.num_hidden_layers` blocks (`model.layers`, `h`, ...).

    Raises:
        ValueError: the model has no such list, or several.
    """
    num_layers = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__} is not supported: layers can be selected from a model whose blocks form one "
            f"nn.ModuleList of config.num_hidden_layers ({num_layers}) entries; found {len(found)} "
            f"({', '.join(found) or 'none'}). Use a decoder-only model such as Llama, Qwen2, GPT-2 or GPT-NeoX.")
    return found[0]


def select_layers(model: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A new model of `model`'s class with the blocks `layers` (in the teacher's order; None: every other one).

    Everything outside the blocks (embeddings, final norm, output head, tied weights) is copied as is; the config's
    layer count and per-layer lists (`layer_types`, ...) follow the kept blocks, and each block's `layer_idx` (its
    slot in the KV cache) is renumbered, so the result saves, loads and generates like any model of its class.
    `model` is left unchanged.

    Raises:
        ValueError: an unsupported architecture (see `layer_stack`), a bad list of layers (see `resolve_layers`), or
            blocks that depend on their position beyond what the config records.
    """
    name = layer_stack(model)
    num_layers = model.config.num_hidden_layers
    kept = resolve_layers(every_other_layer(num_layers) if layers is None else layers, num_layers)
    stack = model.get_submodule(name)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attribute, nn.ModuleList(stack[i] for i in kept))
    try:
        smaller = copy.deepcopy(model)  # copies the kept blocks only; keeps tied weights tied
    finally:
        setattr(parent, attribute, stack)
    _keep_config_layers(smaller.config, kept, num_layers)
    for new_index, block in enumerate(smaller.get_submodule(name)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _check_like_a_fresh_model(smaller, name)
    return smaller


def _keep_config_layers(config, kept: list[int], num_layers: int) -> None:
    """Set the config's layer count, and keep the entries of the kept layers in its per-layer lists."""
    per_layer = {key: value for key, value in vars(config).items()
                 if not key.startswith("_") and isinstance(value, list | tuple) and len(value) == num_layers}
    config.num_hidden_layers = len(kept)  # n_layer on GPT-2, through the config's attribute map
    for key, value in per_layer.items():
        setattr(config, key, type(value)(value[i] for i in kept))


def _check_like_a_fresh_model(model: nn.Module, stack: str) -> None:
    """Raise unless `model` has the parameters and block settings of a model built anew from its config.

    A block that depends on its position in a way the config does not record (a scale by layer index, layers of
    different kinds by a rule of index) would load or run differently once saved; such an architecture is refused.
    """
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    fresh_shapes = {key: tuple(value.shape) for key, value in fresh.state_dict().items()}
    problems = [f"{key}: {shapes.get(key)} instead of {fresh_shapes.get(key)}"
                for key in sorted(shapes.keys() | fresh_shapes.keys()) if shapes.get(key) != fresh_shapes.get(key)]
    blocks = dict(model.get_submodule(stack).named_modules())
    for name, module in fresh.get_submodule(stack).named_modules():
        ours, theirs = _settings(blocks[name]) if name in blocks else {}, _settings(module)
        problems += [f"{stack}.{name}.{key}: {ours.get(key)!r} instead of {theirs.get(key)!r}"
                     for key in sorted(ours.keys() | theirs.keys()) if ours.get(key) != theirs.get(key)]
    if problems:
        raise ValueError(f"{type(model).__name__} is not supported: its kept layers differ from the model their "
                         f"config describes ({'; '.join(problems[:3])}); its layers depend on their position in the "
                         "model and cannot be moved. Choose another architecture.")


def _settings(module: nn.Module) -> dict:
    """A module's plain settings (head_dim, layer_idx, sliding_window, ...), not its state or training mode."""
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and isinstance(value, SCALARS)}
