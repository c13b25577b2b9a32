"""The vLLM engine of `teacher-cache generate`: vLLM's offline engine answers the prompts.

Every (prompt, response) is its own request with its own seed (`teacher_cache.sampling.response_seed`): vLLM then
draws that request's tokens from a generator of its own (one draw per step), so a response does not depend on the
requests it is batched with. (With `n` responses per request vLLM would seed response i with seed + i, which ties
the responses of neighbouring prompts together.) Prefix caching spares the prompt's recomputation for each response.

Log-probs are vLLM's raw ones (`logprobs_mode="raw_logprobs"`: fp32 log-softmax of the model's logits, before
temperature and top-k/top-p): the model's own distribution. The distribution drawn from is not returned alongside
(that needs `processed_logprobs`, an engine-wide mode), so `Response.sampling_logprobs` are derived where the raw
values determine them: at temperature 1 without top-k/top-p they are the raw ones; greedy decoding gives 0.0
(a point mass); with a top-k of at most MAX_TOP_K the request asks for the raw top-k log-probs of each step, which
hold the whole distribution drawn from. Otherwise (a temperature other than 1 or a top-p, without such a top-k) they
are None.

Texts are vLLM's: decoded as they follow the prompt, cut before a stop string, without the text of an ending EOS
token; the transformers engine decodes the same way.

Legend: T generated tokens, K top-k.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from storage.causal_lm import model_directory
from teacher_cache.backend import teacher_identity
from teacher_cache.sampling import Response, Sampling, check_prompt, eos_token_ids, processed_logprobs, response_seed
from teacher_cache.vllm_backend import _flat_logprobs_option, import_vllm, shut_down

log = logging.getLogger(__name__)

# Largest top-k whose sampling log-probs are derived from the raw top-k log-probs (the engine's max_logprobs).
MAX_TOP_K = 128
# Tokens of one engine step on CPU at least, where prompts are never split (a step also fits the model's context).
WHOLE_PREFILL_TOKENS = 16384


def _whole_prefills(max_context: int) -> dict:
    """Engine options that keep every prompt's prefill in one step on CPU. A prompt split over steps (chunked
    prefill) makes vLLM rewind the request's generator for the token it discards, which torch's CPU generators
    cannot do: seeded requests (every response here) then kill the engine ("CPU Generator does not use offset")."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_context, WHOLE_PREFILL_TOKENS)}


class VLLMGenerator:
    """A local Hugging Face model served by vLLM's offline `LLM` engine, answering prompts.

    Args:
        path: model directory (weights, config and tokenizer).
        dtype: "auto" (vLLM's choice: the checkpoint's, bfloat16 for fp32 checkpoints on GPU) or a dtype name.
        tensor_parallel_size, gpu_memory_utilization: passed to vLLM.
        seed: the engine's seed (each response takes its own from `Sampling.seed`).

    Raises:
        ValueError: `path` is not a directory, or vLLM is not installed.
    """

    def __init__(self, path: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, seed: int = 0):
        self.path = model_directory(path)
        LLM, SamplingParams = import_vllm(tensor_parallel_size)  # noqa: N806 (vLLM's classes)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.eos_ids = eos_token_ids(self.path, self.tokenizer)
        self.flat_logprobs = _flat_logprobs_option(SamplingParams)
        context = getattr(self.config, "max_position_embeddings", 0)
        options = {"dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                   "gpu_memory_utilization": gpu_memory_utilization, **_whole_prefills(context)}
        log.info("starting vLLM engine for %s: %s", self.path, options)
        self.llm = LLM(model=self.path, seed=seed, max_logprobs=MAX_TOP_K, logprobs_mode="raw_logprobs",
                       enable_prefix_caching=True, **options)
        model_config = self.llm.llm_engine.model_config
        self.max_context = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.head_dtype = model_config.head_dtype

    def identity(self) -> dict:
        import vllm

        identity = teacher_identity(self.path, "vllm", self.config, self.tokenizer, self.vocab_size, self.dtype,
                                    type(self.config).__name__, head_dtype=self.head_dtype)
        return identity | {"backend_version": vllm.__version__}

    def close(self) -> None:
        """Shut the engine down and free its memory (device memory, its processes)."""
        shut_down(self)

    def generate(self, prompts: list[tuple[int, list[int]]], sampling: Sampling) -> list[Response]:
        """`sampling.num_responses` responses to each (prompt_id, prompt token ids), in (prompt order,
        response_index) order; vLLM schedules and batches the requests itself."""
        from vllm.inputs import TokensPrompt

        keys, requests, params = [], [], []
        for prompt_id, prompt in prompts:
            check_prompt(prompt_id, prompt, self.max_context, sampling)
            for index in range(sampling.num_responses):
                keys.append((prompt_id, index))
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(self._request_params(sampling, response_seed(sampling.seed, prompt_id, index)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [self._response(prompt_id, index, output.outputs[0], sampling)
                for (prompt_id, index), output in zip(keys, outputs, strict=True)]

    def _request_params(self, sampling: Sampling, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=seed, stop=list(sampling.stop),
            stop_token_ids=sorted(self.eos_ids), skip_special_tokens=True, logprobs=_top_logprobs(sampling),
            **self.flat_logprobs,
        )

    def _response(self, prompt_id: int, index: int, completion, sampling: Sampling) -> Response:
        """A Response from vLLM's completion: its tokens, its text, and the log-probs of each step (the drawn
        token's raw log-prob first, then the raw top-k when asked)."""
        token_ids = list(completion.token_ids)
        values_TK1 = _step_values(completion.logprobs, token_ids, _top_logprobs(sampling))
        assert completion.finish_reason in ("stop", "length"), completion.finish_reason
        return Response(prompt_id, index, token_ids, completion.text, values_TK1[:, 0].tolist(),
                        sampling_logprobs(values_TK1, sampling), completion.finish_reason)


def _top_logprobs(sampling: Sampling) -> int:
    """Raw log-probs asked per step besides the drawn token's: the top-k where they give the sampling log-probs."""
    return sampling.top_k if sampling.temperature > 0 and sampling.top_k <= MAX_TOP_K else 0


def sampling_logprobs(values_TK1: np.ndarray, sampling: Sampling) -> list[float] | None:
    """Per token, its log-prob under the distribution drawn from, from vLLM's raw log-probs of each step (the drawn
    token's, then the top-k's when `_top_logprobs` asked for them); None where they do not determine it.

    With a top-k the distribution drawn from lies within the top-k (up to ties at the k-th logit, which vLLM keeps
    and the top-k returned may not), so temperature, top-k and top-p applied to those K values renormalise exactly.
    """
    if sampling.temperature == 0:
        return [0.0] * len(values_TK1)
    if sampling.temperature == 1 and sampling.top_p == 1 and sampling.top_k == 0:
        return values_TK1[:, 0].tolist()
    if _top_logprobs(sampling) == 0:
        return None
    top_TK = torch.from_numpy(values_TK1[:, 1:])
    kept_TK = processed_logprobs(top_TK, sampling).isfinite()
    normaliser_T = (top_TK / sampling.temperature).masked_fill(~kept_TK, float("-inf")).logsumexp(-1)
    return (torch.from_numpy(values_TK1[:, 0]) / sampling.temperature - normaliser_T).tolist()


def _step_values(logprobs, token_ids: list[int], k: int) -> np.ndarray:
    """[T, 1 + k] float32 raw log-probs of each step: the drawn token's, then the top-k's in rank order.

    Takes either container vLLM returns: FlatLogprobs (already in that layout), or, from releases without flat
    log-probs, a {id: Logprob} per step where the drawn token is not repeated when it is in the top-k.
    """
    if hasattr(logprobs, "token_ids"):
        return np.asarray(logprobs.logprobs, np.float32).reshape(len(token_ids), 1 + k)
    rows = [[step[token].logprob] + [value for _, value in sorted((lp.rank, lp.logprob) for lp in step.values()
                                                                   if lp.rank <= k)]
            for step, token in zip(logprobs, token_ids, strict=True)]
    return np.asarray(rows, np.float32).reshape(len(token_ids), 1 + k)
