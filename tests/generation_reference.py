"""Reference computations for the generation engines' tests: plain forwards without a cache, and the sampling
distribution computed the textbook way."""

from __future__ import annotations

import numpy as np
import torch

from teacher_cache.generation import Sampling


def model_logprobs(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """[len(tokens), V] float64 log-softmax of one plain forward over prompt + tokens: the distributions each token
    was drawn at."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.double(), -1).numpy()


def brute_processed(logprobs_V: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution drawn from, the textbook way: sort descending, keep the top k, keep the tokens whose more
    probable kept tokens hold less than top_p, renormalise. Log-probs, -inf outside."""
    scaled = logprobs_V / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    kept = order[: sampling.top_k] if sampling.top_k else order
    p = np.exp(scaled[kept] - np.logaddexp.reduce(scaled[kept]))
    kept = kept[np.cumsum(p) - p < sampling.top_p]
    out = np.full_like(scaled, -np.inf)
    out[kept] = scaled[kept] - np.logaddexp.reduce(scaled[kept])
    return out


def after_prompt(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text `tokens` add after the prompt."""
    return tokenizer.decode(prompt + tokens, skip_special_tokens=True)[
        len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def greedy_tokens(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding without a cache, one full forward per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def by_key(responses) -> dict:
    return {(r.prompt_id, r.response_index): r for r in responses}
