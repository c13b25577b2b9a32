"""The transformers teacher backend: run the teacher over a batch of samples and return its targets as tensors.

`TransformersTeacher` implements `teacher_cache.backend.TeacherBackend` with a Hugging Face causal LM: its
base model gives final hidden states (and chosen layers), and the output head is applied by
`teacher_cache.targets` a chunk of positions at a time, so [batch, time, vocab] logits never exist.

Legend: B batch, L seq_len, H hidden size, P trained positions of the batch.
"""

from __future__ import annotations

import logging

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from storage.layout import hidden_array_name
from teacher_cache.backend import dense_record, model_directory, teacher_identity
from teacher_cache.data import Rows
from teacher_cache.targets import NonFiniteLogits, TargetSpec, describe_nonfinite, extract_targets, first_nonfinite

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TransformersTeacher:
    """A local Hugging Face causal LM as teacher.

    Args:
        path: model directory (weights, config and tokenizer).
        device: torch device name or "auto".
        dtype: "auto" (bfloat16 on CUDA, the checkpoint's dtype on CPU) or a dtype name.
    """

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto"):
        self.path = model_directory(path)
        self.device = resolve_device(device)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else "auto"
        else:
            torch_dtype = TORCH_DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **_dtype_kwarg(torch_dtype)).to(self.device).eval()
        self.head = self.model.get_output_embeddings()
        self.vocab_size = self.head.weight.shape[0]
        self.num_hidden_states = self.model.config.num_hidden_layers + 1
        self._check_head()

    def identity(self) -> dict:
        return teacher_identity(self.path, "transformers", self.model.config, self.tokenizer, self.vocab_size,
                                self.model.dtype, type(self.model).__name__)

    def target_properties(self) -> dict:
        return {}  # every record exact

    def close(self) -> None:
        pass

    def logits(self, hidden_PH: torch.Tensor) -> torch.Tensor:
        """The output head, with the logit post-processing some architectures apply after it."""
        logits = self.head(hidden_PH)
        config = self.model.config
        if getattr(config, "logit_scale", None) is not None:  # Cohere
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite
            logits = logits / config.logits_scaling
        if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_head(self) -> None:
        """Our base-model + head path must give the model's own logits; refuse architectures where it does not."""
        ids = torch.arange(1, 9, device=self.device)[None] % self.vocab_size
        with torch.inference_mode():
            expected = self.model(input_ids=ids).logits.float()
            got = self.logits(self.model.base_model(input_ids=ids).last_hidden_state).float()
        tolerance = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        error = (expected - got).abs().max().item() / max(expected.abs().max().item(), 1.0)
        if error > tolerance:
            raise RuntimeError(
                f"{type(self.model).__name__} post-processes its logits in a way the transformers backend does not "
                f"reproduce (relative error {error:.3g}); this architecture is not supported yet."
            )

    def resolve_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Map layer indices (negative from the end) into [0, num_hidden_states)."""
        n = self.num_hidden_states
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(
                f"--hidden-layers: {bad} out of range; this teacher has {n} hidden states "
                f"(0 = embeddings, 1..{n - 1} = blocks, -1 = last)."
            )
        return tuple(sorted({i % n for i in layers}))

    @torch.inference_mode()
    def compute(self, rows: Rows, spec: TargetSpec, layers: tuple[int, ...], generator: torch.Generator | None,
                hidden_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        ids_BL1 = torch.from_numpy(rows.input_ids).to(self.device)
        attention_BL = torch.from_numpy(rows.attention_mask[:, :-1]).to(self.device)
        trained_P = torch.from_numpy(rows.loss_mask).to(self.device).flatten().nonzero().squeeze(1)
        out = self.model.base_model(
            input_ids=ids_BL1[:, :-1], attention_mask=attention_BL.long(), output_hidden_states=bool(layers),
            use_cache=False,
        )
        B, L, H = out.last_hidden_state.shape
        hidden_PH = out.last_hidden_state.reshape(B * L, H)[trained_P]
        targets = extract_targets(hidden_PH, ids_BL1[:, 1:].reshape(-1)[trained_P], self.logits, spec, generator)
        if (bad := first_nonfinite(targets["entropy"])) is not None:  # the batch's one host sync
            row, position = divmod(int(trained_P[bad]), L)
            raise NonFiniteLogits(row, position, describe_nonfinite(self.logits(hidden_PH[bad]), "logits"))
        record = dense_record(targets, trained_P, B, L)
        mask_BL1 = rows.loss_mask[:, :, None]
        for layer in layers:
            hidden = out.hidden_states[layer] * torch.from_numpy(mask_BL1).to(self.device)
            record[hidden_array_name(layer)] = hidden.to(hidden_dtype)
        return record


def _dtype_kwarg(dtype) -> dict:
    # transformers renamed `torch_dtype` to `dtype` in 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
