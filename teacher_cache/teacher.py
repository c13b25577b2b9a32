"""The transformers teacher backend: run the teacher over a batch of samples and return its targets as tensors.

`TransformersTeacher` implements `teacher_cache.backend.TeacherBackend` with a Hugging Face causal LM: its
base model gives final hidden states (and chosen layers), and the output head is applied by
`teacher_cache.targets` a chunk of positions at a time, so [batch, time, vocab] logits never exist.

Legend: B batch, L seq_len, H hidden size, P trained positions of the batch, c of a chunk, V vocabulary.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import AutoConfig

from storage.causal_lm import CausalLM, forward_inputs, model_directory
from storage.samples import Rows
from teacher_cache.backend import dense_record, teacher_identity
from teacher_cache.targets import NonFiniteLogits, TargetSpec, describe_nonfinite, extract_targets, first_nonfinite
from teacher_cache.targets.hidden import hidden_records, resolve_layers

log = logging.getLogger(__name__)

def check_context_length(model: str, seq_len: int, *, allow_long: bool) -> None:
    """Refuse a `seq_len` beyond the positions the teacher's config allows (`max_position_embeddings`, which GPT-2's
    config maps to `n_positions`); a config without it is not checked. `allow_long` makes it a warning.

    Raises:
        ValueError: `seq_len` exceeds them and `allow_long` is off.
    """
    limit = getattr(AutoConfig.from_pretrained(model_directory(model)), "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return
    found = f"--seq-len {seq_len} exceeds the {limit} positions of the teacher (max_position_embeddings in its config)"
    if not allow_long:
        raise ValueError(f"{found}: past them its targets are usually poor. Use --seq-len {limit} or less, or pass "
                         "--allow-long-context to build anyway.")
    log.warning("%s; building anyway (--allow-long-context): the targets past them are usually poor.", found)


class TransformersTeacher(CausalLM):
    """A local Hugging Face causal LM as teacher: `storage.causal_lm.CausalLM` (model, tokenizer, output head) with
    the backend's target extraction.

    Args:
        path: model directory (weights, config and tokenizer).
        device: torch device name or "auto".
        dtype: "auto" (bfloat16 on CUDA and on CPUs with AMX, else float32) or a dtype name: the body's; the
            output head runs in float32.
    """

    def identity(self) -> dict:
        return teacher_identity(self.path, "transformers", self.model.config, self.tokenizer, self.vocab_size,
                                self.model.dtype, type(self.model).__name__, head_dtype=self.head_dtype)

    def target_properties(self) -> dict:
        return {}  # every record exact

    def close(self) -> None:
        pass

    def resolve_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Map layer indices (negative from the end) into [0, num_hidden_states)."""
        return resolve_layers(layers, self.num_hidden_states)

    @torch.inference_mode()
    def compute(self, rows: Rows, spec: TargetSpec, layers: tuple[int, ...], generator: torch.Generator | None,
                hidden_dtype: torch.dtype = torch.float16, *, isolated: bool = False) -> dict[str, torch.Tensor]:
        ids_BL1 = torch.from_numpy(rows.input_ids).to(self.device)
        attention_BL = torch.from_numpy(rows.attention_mask[:, :-1]).to(self.device)
        segments_BL = torch.from_numpy(rows.segment_ids[:, :-1].astype(np.int64)).to(self.device) if isolated else None
        trained_P = torch.from_numpy(rows.loss_mask).to(self.device).flatten().nonzero().squeeze(1)
        out = self.model.base_model(**forward_inputs(ids_BL1[:, :-1], attention_BL, segments_BL),
                                    output_hidden_states=bool(layers))
        B, L, H = out.last_hidden_state.shape
        hidden_PH = out.last_hidden_state.reshape(B * L, H)[trained_P]
        # One logits buffer for every chunk of the batch (see `CausalLM.logits`).
        logits_cV = hidden_PH.new_empty(min(spec.chunk_positions, len(trained_P)), self.vocab_size,
                                        dtype=self.head_dtype)
        targets = extract_targets(hidden_PH, ids_BL1[:, 1:].reshape(-1)[trained_P],
                                  lambda hidden_cH: self.logits(hidden_cH, logits_cV[:len(hidden_cH)]), spec, generator)
        if (bad := first_nonfinite(targets["entropy"])) is not None:  # the batch's one host sync
            row, position = divmod(int(trained_P[bad]), L)
            raise NonFiniteLogits(row, position, describe_nonfinite(self.logits(hidden_PH[bad]), "logits"))
        return dense_record(targets, trained_P, B, L) | hidden_records(out.hidden_states, layers, rows.loss_mask,
                                                                        hidden_dtype)

