"""What every teacher backend is and shares: the `TeacherBackend` protocol the build talks to, and the parts both
backends (`teacher_cache.teacher`: transformers, `teacher_cache.vllm_backend`: vLLM) use: the model directory check,
the manifest's `teacher` section and the scatter of per-position targets into [B, L] records.

Sits below the backends, which import it and never each other; `teacher_cache.backend_registry` picks one by name.

Legend: B batch, L seq_len, P trained positions of the batch.
"""

from __future__ import annotations

from typing import Protocol

import torch

from storage.identity import config_fingerprint, tokenizer_fingerprint, weights_fingerprint
from storage.samples import Rows
from storage.targets.sampled import FLAT_ARRAYS
from teacher_cache.targets import TargetSpec


class TeacherBackend(Protocol):
    """What a build needs from a teacher."""

    tokenizer: object
    vocab_size: int
    num_hidden_states: int

    def identity(self) -> dict:
        """The manifest's `teacher` section."""

    def target_properties(self) -> dict:
        """Per target kind, entries merged into the manifest's `targets` section (how records are approximated)."""

    def resolve_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Hidden-state indices in [0, num_hidden_states), or a ValueError naming the problem."""

    def close(self) -> None:
        """Release the teacher's resources."""

    def compute(self, rows: Rows, spec: TargetSpec, layers: tuple[int, ...], generator: torch.Generator | None,
                hidden_dtype: torch.dtype = torch.float16, *, isolated: bool = False) -> dict[str, torch.Tensor]:
        """Targets of a batch: dense [B, L, ...] records, flat sampled entries, and hidden states by name. With
        `isolated`, each token attends only to the earlier tokens of its own document (`rows.segment_ids`).

        Raises:
            NonFiniteLogits: the teacher gave no distribution at some trained position of the batch.
        """


def teacher_identity(path: str, backend: str, config, tokenizer, vocab_size: int, dtype, architecture: str, *,
                     head_dtype) -> dict:
    """The manifest's `teacher` section, the same for every backend; `architecture` names models without one.
    `dtype` is the body's, `head_dtype` that of the output head and the logits (FORMAT.md, "Which distribution the
    targets describe")."""
    return {
        "model": path,
        "backend": backend,
        "architecture": (config.architectures or [architecture])[0],
        "config_sha256": config_fingerprint(config.to_dict()),
        "weights_sha256": weights_fingerprint(path),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(vocab_size),
        "tokenizer_vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
        "head_dtype": str(head_dtype).removeprefix("torch."),
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


def dense_record(targets: dict[str, torch.Tensor], trained_P: torch.Tensor, B: int, L: int) -> dict[str, torch.Tensor]:
    """Per-position targets of the trained positions -> [B, L, ...] records (zero elsewhere), compacted."""
    record = {}
    for name, value in targets.items():
        if name not in FLAT_ARRAYS:  # per-position records are scattered back to [B, L]
            full = value.new_zeros((B * L, *value.shape[1:]))
            full[trained_P] = value
            value = full.reshape(B, L, *value.shape[1:])
        record[name] = _compact(name, value)
    return record


def _compact(name: str, value: torch.Tensor) -> torch.Tensor:
    """Shrink before the device-to-host copy: ids to int32 (log-probs stay fp32 for the store's 1/64-nat steps)."""
    if value.dtype == torch.int64:
        return value.to(torch.int32)
    return value
