"""The engines of `teacher-cache generate`: a teacher writes responses to prompts. `load_generator` picks the engine
a run's `--backend` names; `TransformersGenerator` is the transformers one (`teacher_cache.vllm_generation` the
vLLM one, imported only when asked for). The shared types (`Sampling`, `Response`, `Generator`) live in
`teacher_cache.sampling` and are re-exported here.

The transformers engine decodes with its own loop, so that a response depends only on (model, prompt, sampling,
prompt_id, response_index): up to `batch_size` sequences (prompt x response) are left-padded into one batch, prefilled,
then decoded one token a step with the KV cache; each sequence draws its tokens with its own `torch.Generator`
(Gumbel-max over uniform noise of its own), and leaves the batch when it finishes. With stop strings, each step
decodes a sequence's tokens to look for them.

Legend: B sequences in the batch, T tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from storage.causal_lm import CausalLM
from teacher_cache.backend import teacher_identity
from teacher_cache.sampling import (
    Generator,
    Response,
    Sampling,
    check_prompt,
    eos_token_ids,
    processed_logprobs,
    response_seed,
)

__all__ = ["Generator", "Response", "Sampling", "TransformersGenerator", "load_generator"]

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
# Prompt tokens decoded ahead of a response's, so that its text reads as it follows the prompt (as vLLM decodes it).
PROMPT_CONTEXT = 5


def load_generator(backend: str, model: str, *, device: str, dtype: str, batch_size: int, tensor_parallel_size: int,
                   gpu_memory_utilization: float, seed: int) -> Generator:
    """The engine `backend` names, loaded from the model directory `model`.

    Args:
        backend: "transformers" or "vllm".
        model: local model directory (weights, config and tokenizer).
        device: the transformers engine's torch device ("auto": CUDA when there is one).
        dtype: "auto" or a dtype name, as for `teacher-cache build`.
        batch_size: sequences (prompt x response) the transformers engine decodes at once; vLLM schedules its own.
        tensor_parallel_size, gpu_memory_utilization: the vLLM engine's.
        seed: the vLLM engine's seed (responses take theirs from `Sampling.seed`).

    Raises:
        ValueError: an unknown backend, no such model directory, or vLLM missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "vllm":
        from teacher_cache.vllm_generation import VLLMGenerator

        return VLLMGenerator(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    return TransformersGenerator(model, device=device, dtype=dtype, batch_size=batch_size)


@dataclass
class _Sequence:
    """One response being generated: its draws and its tokens so far."""

    prompt_id: int
    response_index: int
    prompt: list[int]
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    cut: int | None = None  # where a stop string starts in the text
    finish_reason: str | None = None

    def append(self, token: int, logprob: float, sampling_logprob: float, sampling: Sampling,
               eos_ids: frozenset[int], tokenizer) -> None:
        """Add a drawn token; finish on an EOS token, a stop string, or the length limit."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.sampling_logprobs.append(sampling_logprob)
        if token in eos_ids:
            self.finish_reason = "stop"
        elif sampling.stop and (cut := _first_stop(self.text(tokenizer), sampling.stop)) is not None:
            self.cut, self.finish_reason = cut, "stop"
        elif len(self.token_ids) == sampling.max_new_tokens:
            self.finish_reason = "length"

    def text(self, tokenizer) -> str:
        """The tokens' text as it follows the prompt: decoded after the prompt's last tokens (a SentencePiece token
        that opens a word keeps its space), special tokens skipped, an ending EOS token left out, cut before a stop
        string."""
        tokens = self.token_ids[:-1] if self.finish_reason == "stop" and self.cut is None else self.token_ids
        context = self.prompt[-PROMPT_CONTEXT:]
        before = tokenizer.decode(context, skip_special_tokens=True)
        text = tokenizer.decode(context + tokens, skip_special_tokens=True)[len(before):]
        return text if self.cut is None else text[: self.cut]

    def response(self, tokenizer) -> Response:
        return Response(self.prompt_id, self.response_index, self.token_ids, self.text(tokenizer), self.logprobs,
                        self.sampling_logprobs, self.finish_reason)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the stop strings in `text` starts; None when there is none."""
    found = [index for string in stop if (index := text.find(string)) >= 0]
    return min(found, default=None)


class TransformersGenerator(CausalLM):
    """A local Hugging Face causal LM answering prompts with its own decoding loop.

    Args:
        path: model directory (weights, config and tokenizer).
        device: torch device name or "auto".
        dtype: "auto" (bfloat16 on CUDA and on CPUs with AMX, else float32) or a dtype name.
        batch_size: sequences (prompt x response) decoded at once.
    """

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        super().__init__(path, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_context = int(self.model.config.max_position_embeddings)
        self.eos_ids = eos_token_ids(self.path, self.tokenizer)

    def identity(self) -> dict:
        return teacher_identity(self.path, "transformers", self.model.config, self.tokenizer, self.vocab_size,
                                self.model.dtype, type(self.model).__name__, head_dtype=self.head_dtype)

    def close(self) -> None:
        pass

    def generate(self, prompts: list[tuple[int, list[int]]], sampling: Sampling) -> list[Response]:
        """`sampling.num_responses` responses to each (prompt_id, prompt token ids), in (prompt order,
        response_index) order. Sequences are batched by prompt length (least padding); each draws from its own
        generator, so the batches change nothing but float noise."""
        sequences = []
        for prompt_id, prompt in prompts:
            check_prompt(prompt_id, prompt, self.max_context, sampling)
            for index in range(sampling.num_responses):
                generator = torch.Generator(self.device).manual_seed(response_seed(sampling.seed, prompt_id, index))
                sequences.append(_Sequence(prompt_id, index, list(prompt), generator))
        by_length = sorted(sequences, key=lambda sequence: -len(sequence.prompt))
        for start in range(0, len(by_length), self.batch_size):
            self._decode(by_length[start: start + self.batch_size], sampling)
        return [sequence.response(self.tokenizer) for sequence in sequences]

    @torch.inference_mode()
    def _decode(self, batch: list[_Sequence], sampling: Sampling) -> None:
        """Generate every sequence of `batch` to its end: prefill the left-padded prompts, then one token a step."""
        T = max(len(sequence.prompt) for sequence in batch)
        ids_BT = torch.zeros((len(batch), T), dtype=torch.long)
        mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids_BT[row, T - len(sequence.prompt):] = torch.tensor(sequence.prompt)
            mask_BT[row, T - len(sequence.prompt):] = 1
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        out = self.model.base_model(input_ids=ids_BT, attention_mask=mask_BT,
                                    position_ids=(mask_BT.cumsum(-1) - 1).clamp_min(0), use_cache=True)
        cache, live, steps = out.past_key_values, batch, 0
        while True:
            tokens_B = self._step(out.last_hidden_state[:, -1], live, sampling)
            steps += 1
            keep = [row for row, sequence in enumerate(live) if sequence.finish_reason is None]
            if not keep:
                break
            if len(keep) < len(live):  # finished sequences leave the batch and its cache
                keep_B = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_B)
                mask_BT, tokens_B, live = mask_BT[keep_B], tokens_B[keep_B], [live[row] for row in keep]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones((len(live), 1))], dim=1)
            out = self.model.base_model(input_ids=tokens_B[:, None], attention_mask=mask_BT,
                                        position_ids=mask_BT.sum(-1, keepdim=True) - 1, past_key_values=cache,
                                        use_cache=True)
        log.debug("generated %d sequences of prompts up to %d tokens in %d steps", len(batch), T, steps)

    def _step(self, hidden_BH: torch.Tensor, live: list[_Sequence], sampling: Sampling) -> torch.Tensor:
        """Draw the next token of each live sequence from its last hidden state and append it; the tokens [B]."""
        tokens_B, logprobs_B, sampling_logprobs_B = next_tokens(
            self.logits(hidden_BH).float(), sampling, [sequence.generator for sequence in live])
        for sequence, token, logprob, sampling_logprob in zip(
                live, tokens_B.tolist(), logprobs_B.tolist(), sampling_logprobs_B.tolist(), strict=True):
            sequence.append(token, logprob, sampling_logprob, sampling, self.eos_ids, self.tokenizer)
        return tokens_B


def next_tokens(logits_BV: torch.Tensor, sampling: Sampling,
                generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row, (tokens, their log-probs under the model, under the distribution drawn from), each [B].

    Greedy (temperature 0): the argmax, drawn with probability 1 (sampling log-prob 0). Otherwise Gumbel-max: the
    argmax of the processed log-probs plus Gumbel noise made from each row's own generator's uniforms, an exact draw
    from the processed distribution whatever the other rows are.
    """
    logprobs_BV = logits_BV.float().log_softmax(-1)
    if sampling.temperature == 0:
        tokens_B = logits_BV.argmax(-1)
        sampling_logprobs_B = torch.zeros(tokens_B.shape, device=logits_BV.device)
    else:
        processed_BV = processed_logprobs(logits_BV, sampling)
        V = logits_BV.shape[-1]
        uniform_BV = torch.stack([torch.rand(V, generator=g, device=logits_BV.device) for g in generators])
        tokens_B = (processed_BV - (-uniform_BV.log()).log()).argmax(-1)  # a uniform of 0 gives -inf: never drawn
        sampling_logprobs_B = processed_BV.gather(-1, tokens_B[:, None])[:, 0]
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None])[:, 0], sampling_logprobs_B
