"""What generating responses means for every engine of `teacher-cache generate`: the sampling settings, the
`Response` an engine returns, the `Generator` protocol, and the parts both engines share (the seed of each response,
the tokens that end one, the distribution tokens are drawn from).

Sits below the engines (`teacher_cache.generation`: transformers, `teacher_cache.vllm_generation`: vLLM), which
import it and never each other; `teacher_cache.generation` also re-exports it and picks an engine by name.

Legend: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, GenerationConfig


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How responses are drawn. Each token comes from the model's distribution divided by `temperature`, cut to the
    `top_k` most probable tokens, then to the most probable of those holding `top_p` of their mass, renormalised
    (the order vLLM's sampler applies them in).

    Raises:
        ValueError: a value out of range, naming its option.
    """

    num_responses: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 is greedy decoding (the most probable token)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most probable tokens holding this much probability, in (0, 1]; 1 keeps all."""
    top_k: int = 0
    """Keep the k most probable tokens; 0 keeps all."""
    max_new_tokens: int = 256
    """Tokens generated at most per response."""
    seed: int = 0
    """Seed of the draws: a response depends on it, its prompt's id and its index, not on its batch."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (besides the model's EOS tokens); the text is cut before the first one."""

    def __post_init__(self):
        checks = (
            ("--num-responses", self.num_responses, self.num_responses >= 1, "an integer >= 1"),
            ("--temperature", self.temperature, self.temperature >= 0, "a number >= 0 (0 is greedy decoding)"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "a number in (0, 1] (1 keeps every token)"),
            ("--top-k", self.top_k, self.top_k >= 0, "an integer >= 0 (0 keeps every token)"),
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, "an integer >= 1"),
        )
        for flag, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{flag}: expected {expected}, got {value}.")
        if "" in self.stop:
            raise ValueError(f"--stop: expected non-empty strings, got {list(self.stop)}; drop the empty one.")

    def manifest_entry(self) -> dict:
        """The settings as plain JSON values, for the output's manifest."""
        return dataclasses.asdict(self) | {"stop": list(self.stop)}


@dataclass(frozen=True)
class Response:
    """One generated response.

    Attributes:
        prompt_id: the caller's id of the prompt.
        response_index: 0 .. num_responses - 1.
        token_ids: the generated tokens only; ends with the EOS token when one ended the response.
        text: the reply decoded after the prompt (special tokens skipped; an EOS token adds nothing), cut before a
            stop string.
        logprobs: per token of `token_ids`, its log-prob under the model's own distribution (temperature 1, the whole
            vocabulary), from fp32 logits.
        sampling_logprobs: per token, its log-prob under the distribution it was drawn from (`Sampling`'s temperature,
            top-k and top-p applied, renormalised); 0.0 for each token of greedy decoding (a point mass). None where
            the engine cannot give them (the vLLM engine's docstring says when).
        finish_reason: "stop" (an EOS token or a stop string) or "length" (max_new_tokens reached).
    """

    prompt_id: int
    response_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    sampling_logprobs: list[float] | None
    finish_reason: str


class Generator(Protocol):
    """What `teacher-cache generate` needs from an engine."""

    tokenizer: object
    max_context: int
    """Prompt tokens + new tokens the model accepts (its max_position_embeddings)."""

    def identity(self) -> dict:
        """The generating model, as a store manifest's `teacher` section describes one."""

    def generate(self, prompts: list[tuple[int, list[int]]], sampling: Sampling) -> list[Response]:
        """`sampling.num_responses` responses to each (prompt_id, prompt token ids), in (prompt order,
        response_index) order. A prompt must leave room for `sampling.max_new_tokens` within `max_context`
        (`check_prompt` raises a ValueError otherwise)."""

    def close(self) -> None:
        """Release the engine's resources."""


def check_prompt(prompt_id: int, prompt: list[int], max_context: int, sampling: Sampling) -> None:
    """Refuse a prompt without tokens, or one that leaves no room for `sampling.max_new_tokens` in the context.

    Raises:
        ValueError: naming the prompt, its length and the room it has.
    """
    room = max_context - sampling.max_new_tokens
    if not 1 <= len(prompt) <= room:
        raise ValueError(f"prompt {prompt_id} has {len(prompt)} tokens; the model takes 1 to {room} with "
                         f"--max-new-tokens {sampling.max_new_tokens} in its context of {max_context}. Shorten or "
                         "skip the prompt, or lower --max-new-tokens.")


def response_seed(seed: int, prompt_id: int, response_index: int) -> int:
    """The seed of one response's draws: a hash of (seed, prompt_id, response_index), 63 bits so that both torch and
    vLLM take it. Responses get independent streams whatever batch they are drawn in."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{response_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def eos_token_ids(path: str, tokenizer) -> frozenset[int]:
    """The tokens that end a response: the tokenizer's EOS and every id of the model's generation config
    (generation_config.json, else derived from config.json), where chat models name their end-of-turn token."""
    if (Path(path) / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(path)
    else:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    ids = generation.eos_token_id
    ids = [ids] if isinstance(ids, int) or ids is None else list(ids)
    return frozenset([tokenizer.eos_token_id, *ids]) - {None}


def processed_logprobs(logits_BV: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """fp32 log-probs of the distribution `sampling` draws from (temperature > 0), -inf outside it.

    Order and boundaries as in vLLM's sampler: logits / temperature; keep those >= the k-th largest (ties at the k-th
    stay); then, over the tokens left, drop the least probable ones whose cumulative probability (ascending) is at
    most 1 - top_p, always keeping the most probable; renormalise.
    """
    scaled_BV = logits_BV.float() / sampling.temperature
    if 0 < sampling.top_k < scaled_BV.shape[-1]:
        kth_B1 = scaled_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1)  # ascending
        drop_BV = sorted_BV.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop_BV[:, -1] = False
        scaled_BV = scaled_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return scaled_BV.log_softmax(-1)
