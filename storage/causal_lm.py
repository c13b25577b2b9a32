"""A model directory opened the same way by both phases: the device, the dtype, and a Hugging Face causal LM whose
output head is applied to hidden states a chunk of positions at a time.

The build computes its targets from `CausalLM.logits` (`teacher_cache/teacher.py`), and `student-train` scores
students and runs an online teacher with the same head (`student_train/evaluate.py`, `online_teacher.py`), so the
logits a store's targets describe (FORMAT.md, "Which distribution the targets describe") and those a student is
measured against come from one piece of code, logit post-processing included.

The body runs in the model's dtype (`--dtype`; `auto_dtype` says what "auto" picks); the head always runs in
float32, so the logits are the body's final hidden states' distribution to float32 precision, not rounded to the
body's dtype.

Legend: P positions, H hidden size, V vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ("auto", *TORCH_DTYPES)  # the choices of a model's --dtype
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 matrix units the OS lets programs use: the `amx_bf16` flag of
    /proc/cpuinfo (Linux lists it only when the kernel supports AMX). False where there is no /proc/cpuinfo."""
    if not CPUINFO.is_file():
        return False
    flags = next((line for line in CPUINFO.read_text().splitlines() if line.startswith("flags")), "")
    return "amx_bf16" in flags.split()


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype `--dtype auto` runs a model's body in on `device`, logged with what decided it.

    bfloat16 on CUDA, and on CPUs with AMX bfloat16 units (`cpu_has_amx_bf16`); float32 elsewhere: a CPU without
    them has no fast bfloat16 matrix product (on a 2-core AMD EPYC, a build ran 4x slower in bfloat16 than in
    float32).
    """
    if device.type == "cuda":
        dtype, where = torch.bfloat16, "CUDA"
    elif device.type == "cpu":
        amx = cpu_has_amx_bf16()
        dtype, where = (torch.bfloat16, "this CPU (AMX)") if amx else (torch.float32, "this CPU (no AMX)")
    else:
        dtype, where = torch.float32, device.type
    log.info("dtype auto: %s on %s", str(dtype).removeprefix("torch."), where)
    return dtype


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

    The head runs in float32 whatever the body's dtype: `head_weight_VH` is a float32 copy of the output head's
    weight (of the input embedding when the two are tied), made once at load. In a bfloat16 or float16 model it
    costs V x H x 4 bytes on the device (about 2 GiB for a 128k x 4096 head); in a float32 model it is the weight
    itself.

    Args:
        path: model directory (weights, config and tokenizer).
        device: torch device name or "auto".
        dtype: "auto" (`auto_dtype`: bfloat16 on CUDA and on CPUs with AMX, else float32) or a dtype name of
            `TORCH_DTYPES`; the dtype of the body.

    Raises:
        ValueError: `path` is not a directory.
        RuntimeError: the architecture post-processes its logits in a way `logits` does not reproduce.
    """

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto"):
        self.path = model_directory(path)
        self.device = resolve_device(device)
        torch_dtype = auto_dtype(self.device) if dtype == "auto" else TORCH_DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **dtype_kwarg(torch_dtype)).to(self.device).eval()
        head = self.model.get_output_embeddings()
        self.head_weight_VH = head.weight.detach().float()
        self.head_bias_V = None if head.bias is None else head.bias.detach().float()
        self.vocab_size = self.head_weight_VH.shape[0]
        self.num_hidden_states = self.model.config.num_hidden_layers + 1
        self._check_head()

    @property
    def head_dtype(self) -> torch.dtype:
        """The dtype the output head and the logit post-processing run in: float32."""
        return self.head_weight_VH.dtype

    def logits(self, hidden_PH: torch.Tensor, out_PV: torch.Tensor | None = None) -> torch.Tensor:
        """[P, V] float32 logits of hidden states in any dtype: the output head in float32 (the hidden states
        upcast, which is exact), with the logit post-processing some architectures apply after it.

        `out_PV`, a [P, V] float32 buffer, receives them: a caller that reuses one spares the page faults of fresh
        memory, on CPU about as costly as a pass over the logits."""
        logits = torch.matmul(hidden_PH.float(), self.head_weight_VH.T, out=out_PV)
        if self.head_bias_V is not None:
            logits.add_(self.head_bias_V)
        config = self.model.config
        if getattr(config, "logit_scale", None) is not None:  # Cohere
            logits.mul_(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:  # Granite
            logits.div_(config.logits_scaling)
        if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            cap = config.final_logit_softcapping
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _check_head(self) -> None:
        """Our base-model + head path must give the model's own logits; refuse architectures where it does not.

        The model's own head runs in its dtype, ours in float32: in a bfloat16 or float16 model the two differ by
        the rounding of each logit to that dtype (half a unit in the last place, eps / 2 of its magnitude) and of
        the post-processing after it. The tolerance is 4 eps (bfloat16: 0.031, float16: 0.0039) of the largest
        logit, and 1e-3 for float32 (other kernels); a missing scale or soft cap changes logits by far more.
        """
        ids = torch.arange(1, 9, device=self.device)[None] % self.vocab_size
        with torch.inference_mode():
            expected = self.model(input_ids=ids).logits.float()
            got = self.logits(self.model.base_model(input_ids=ids).last_hidden_state)
        tolerance = max(1e-3, 4 * torch.finfo(self.model.dtype).eps)
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
