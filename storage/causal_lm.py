"""A model directory opened the same way by both phases: the device, the dtype, and a Hugging Face causal LM whose
output head is applied to hidden states a chunk of positions at a time.

The build computes its targets from `CausalLM.logits` (`teacher_cache/teacher.py`), and `student-train` scores
students and runs an online teacher with the same head (`student_train/evaluate.py`, `online_teacher.py`), so the
logits a store's targets describe (FORMAT.md, "Which distribution the targets describe") and those a student is
measured against come from one piece of code, logit post-processing included.

Legend: P positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ("auto", *TORCH_DTYPES)  # the choices of a model's --dtype


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_directory(path: str) -> str:
    """The absolute path of the local model directory `path`; a ValueError naming the fix when there is none."""
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ValueError(
            f"--model {path}: no such directory. Pass the local directory of a Hugging Face model "
            "(config, weights and tokenizer), e.g. one fetched with `huggingface-cli download`."
        )
    return str(local.resolve())


class CausalLM:
    """A local Hugging Face causal LM with its tokenizer, in inference mode.

    `model.base_model` gives hidden states; `logits` applies the output head to them, so callers choose how many
    positions' [P, V] logits exist at once.

    Args:
        path: model directory (weights, config and tokenizer).
        device: torch device name or "auto".
        dtype: "auto" (bfloat16 on CUDA, the checkpoint's dtype on CPU) or a dtype name of `TORCH_DTYPES`.

    Raises:
        ValueError: `path` is not a directory.
        RuntimeError: the architecture post-processes its logits in a way `logits` does not reproduce.
    """

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto"):
        self.path = model_directory(path)
        self.device = resolve_device(device)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else "auto"
        else:
            torch_dtype = TORCH_DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **dtype_kwarg(torch_dtype)).to(self.device).eval()
        self.head = self.model.get_output_embeddings()
        self.vocab_size = self.head.weight.shape[0]
        self.num_hidden_states = self.model.config.num_hidden_layers + 1
        self._check_head()

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
                f"{type(self.model).__name__} post-processes its logits in a way this project does not reproduce "
                f"(relative error {error:.3g}); this architecture is not supported yet."
            )


def dtype_kwarg(dtype) -> dict:
    """The keyword of `from_pretrained` that sets the weights' dtype: `dtype`, or `torch_dtype` before transformers
    4.56 renamed it."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def document_positions(segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] position of each token within its document: 0 at the sample's first token and wherever the segment id
    changes (a packed sample's next document), counting up from there."""
    index_BL = torch.arange(segment_ids_BL.shape[1], device=segment_ids_BL.device).expand_as(segment_ids_BL)
    starts_BL = torch.ones_like(segment_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    return index_BL - torch.where(starts_BL, index_BL, 0).cummax(dim=1).values


def forward_inputs(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor,
                   segment_ids_BL: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """The keyword arguments of a base model's forward over [B, L] tokens.

    Without `segment_ids_BL`, every token attends to the sample's earlier real tokens (`attention_mask_BL`), across
    packed documents. With them (document-isolated packing), positions restart at each document and no 2D mask is
    given, so transformers builds a block-diagonal causal mask from the positions (its packed-sequence path: SDPA
    and eager attention get the mask, flash attention the sequence boundaries): each token attends only to its own
    document. Padding, at a sample's end only, is then attended to by nothing real. No KV cache either way.
    """
    if segment_ids_BL is None:
        return {"input_ids": input_ids_BL, "attention_mask": attention_mask_BL.long(), "use_cache": False}
    # Without a cache: transformers reads packed sequences from the positions only when there is none.
    return {"input_ids": input_ids_BL, "attention_mask": None, "position_ids": document_positions(segment_ids_BL),
            "use_cache": False}
