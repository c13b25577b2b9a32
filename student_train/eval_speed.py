"""Speed and peak memory of one model's forward over the evaluation batches, each model in a fresh process.

A fresh (spawned) process per model, so that what it measures belongs to that model alone:

- peak memory on CUDA is `torch.cuda.max_memory_allocated` over loading the model and the timed forwards
  (weights, activations, the head's logits of one chunk, as torch's caching allocator counts them). On CPU it is
  the process's peak resident set size over the same span minus its resident size before it (weights,
  activations and allocator overhead, as the operating system counts them): on Linux the peak is reset first
  (`/proc/self/clear_refs`) and read from `VmHWM`; elsewhere it is the growth of `ru_maxrss` from after the
  imports, a lower bound when the imports peaked higher than the process's size after them.
- time is that of the forward the evaluation runs: the base model over a batch, then the output head over every
  position a chunk at a time (without the elementwise logit post-processing of a few architectures), under
  `torch.inference_mode`, after one warm-up batch, synchronised on CUDA. Tokens are the real (non-padding) tokens
  read, so `ms_per_token` is scoring (prefill) time per token at this batch size, not the latency of generating
  one token.

Neither the tokenizer (tens of MiB) nor the import of the architecture's code is loaded in the measured span: the
figures are the model's.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

PEAK_RSS_SOURCE = "VmHWM" if sys.platform.startswith("linux") else "ru_maxrss"


def measure_in_fresh_process(path: str, *, device: str, dtype: str, input_ids: np.ndarray,
                             attention_mask: np.ndarray, batch_size: int, chunk_positions: int) -> dict:
    """`measure` in a new spawned process; see the module docstring for what is measured."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, path, device=device, dtype=dtype, input_ids=input_ids,
                           attention_mask=attention_mask, batch_size=batch_size,
                           chunk_positions=chunk_positions).result()


def measure(path: str, *, device: str, dtype: str, input_ids: np.ndarray, attention_mask: np.ndarray,
            batch_size: int, chunk_positions: int) -> dict:
    """Load the model at `path` (dtype: a torch dtype name) and time its forward over the rows of L + 1 tokens.

    Returns:
        forward_seconds, forward_tokens, forward_batches, tokens_per_s, ms_per_token, peak_memory_bytes, and
        peak_memory: what was measured.
    """
    cuda = torch.device(device).type == "cuda"
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # imports its code now
    rss_before = _start_peak_rss()
    model = model_class.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    batches = [(torch.from_numpy(input_ids[i:i + batch_size, :-1]).to(device),
                torch.from_numpy(attention_mask[i:i + batch_size, :-1]).to(device).long())
               for i in range(0, len(input_ids), batch_size)]
    with torch.inference_mode():
        _forward(model, *batches[0], chunk_positions)  # warm-up: first-call allocations and kernel selection
        _synchronize(cuda)
        start = time.perf_counter()
        for ids_BL, mask_BL in batches:
            _forward(model, ids_BL, mask_BL, chunk_positions)
        _synchronize(cuda)
        seconds = time.perf_counter() - start
    tokens = int(attention_mask[:, :-1].sum())
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated, fresh process"
    else:
        peak, kind = _peak_rss() - rss_before, f"peak RSS growth ({PEAK_RSS_SOURCE}), fresh process"
    return {"forward_seconds": seconds, "forward_tokens": tokens, "forward_batches": len(batches),
            "tokens_per_s": tokens / seconds, "ms_per_token": 1000 * seconds / tokens,
            "peak_memory_bytes": int(peak), "peak_memory": kind}


def _forward(model, ids_BL: torch.Tensor, mask_BL: torch.Tensor, chunk: int) -> None:
    hidden_BLH = model.base_model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False).last_hidden_state
    hidden_PH, head = hidden_BLH.flatten(0, 1), model.get_output_embeddings()
    for i in range(0, len(hidden_PH), chunk):
        head(hidden_PH[i:i + chunk])


def _synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _start_peak_rss() -> int:
    """Start measuring the peak resident set size; returns the size it grows from."""
    if PEAK_RSS_SOURCE == "VmHWM":
        Path("/proc/self/clear_refs").write_text("5")  # sets the peak (VmHWM) to the current size
        return _proc_status_bytes("VmRSS")
    return _peak_rss()


def _peak_rss() -> int:
    if PEAK_RSS_SOURCE == "VmHWM":
        return _proc_status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line.")
