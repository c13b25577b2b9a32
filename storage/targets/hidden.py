"""Hidden states: the teacher's hidden states after chosen blocks, for feature distillation
(`teacher-cache build --hidden-layers 4,8`; manifest section `hidden_states`).

One array per layer, `hidden_states_{layer}` [S, L, H] (0 = the embeddings), in the manifest's dtype, zero at
padding. Ensembles drop them (each member's are of another model).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from storage.layout import ArraySpec
from storage.targets.base import TargetKind

log = logging.getLogger(__name__)

PREFIX = "hidden_states_"


def section(layers: list[int], dtype: str, hidden_size: int) -> dict:
    """The manifest's `hidden_states` section."""
    return {"layers": list(layers), "dtype": dtype, "hidden_size": hidden_size}


def hidden_array_name(layer: int) -> str:
    """Array name for the hidden states of `layer` (an index into the model's hidden-state tuple, >= 0)."""
    return f"{PREFIX}{layer}"


class Hidden(TargetKind):
    name = "hidden"
    section = "hidden_states"

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        hidden = targets["hidden_states"]
        dtype = np.dtype(hidden.get("dtype", "float16"))
        return [ArraySpec(hidden_array_name(layer), ("S", "L", "H"), dtype, "shuffle_zstd",
                          f"hidden states after block {layer} (0 = embeddings)") for layer in hidden["layers"]]

    def axis_lengths(self, targets: dict) -> dict[str, int]:
        return {"H": targets["hidden_states"].get("hidden_size")}

    def describe(self, targets: dict) -> str:
        return ""  # `info` lists the layers apart

    def collate(self, record, targets):
        return {name: torch.from_numpy(value.astype(np.float32)) for name, value in record.items()
                if name.startswith(PREFIX)}

    def ensemble(self, names: list[str], targets: list[dict], *, weights: list[float], top_k: int | None) -> None:
        """Hidden states are never ensembled: warns which are dropped."""
        if hidden := [name for name, t in zip(names, targets, strict=True) if self.present(t)]:
            log.warning("hidden states dropped: those of %s are of different models", ", ".join(hidden))


HIDDEN = Hidden()
