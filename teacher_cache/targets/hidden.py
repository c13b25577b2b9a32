"""The teacher side of hidden states (`storage.targets.hidden`): which layers `--hidden-layers` names, and their
capture from the model's forward (not from its logits, so no `Extractor`), zero off the trained positions.

Legend: B batch, L seq_len, H hidden size.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.targets import hidden


def resolve_layers(layers: tuple[int, ...], num_hidden_states: int) -> tuple[int, ...]:
    """Map layer indices (negative from the end) into [0, num_hidden_states), sorted and without repeats.

    Raises:
        ValueError: an index out of range, naming the teacher's range.
    """
    n = num_hidden_states
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(
            f"--hidden-layers: {bad} out of range; this teacher has {n} hidden states "
            f"(0 = embeddings, 1..{n - 1} = blocks, -1 = last)."
        )
    return tuple(sorted({i % n for i in layers}))


def manifest_section(layers: tuple[int, ...], dtype: str, hidden_size: int) -> dict[str, dict]:
    """The manifest's `targets` sections of the hidden states of `layers` (none without layers)."""
    return {"hidden_states": hidden.section(list(layers), dtype, hidden_size)} if layers else {}


def hidden_records(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...], loss_mask_BL: np.ndarray,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The [B, L, H] record of each layer's hidden states, zero where the loss mask is not set."""
    records = {}
    for layer in layers:
        mask_BL1 = torch.from_numpy(loss_mask_BL[:, :, None]).to(hidden_states[layer].device)
        records[hidden.hidden_array_name(layer)] = (hidden_states[layer] * mask_BL1).to(dtype)
    return records
