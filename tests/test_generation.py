"""The transformers generation engine against brute force: plain full-sequence forwards of the same model (no cache,
no padding), a sampling distribution computed here in float64, and draw frequencies against it.

Also the shared pieces of both engines (`teacher_cache.sampling`): the checks of `Sampling`, the EOS tokens.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from generation_reference import after_prompt, brute_processed, by_key, greedy_tokens, model_logprobs
from transformers import AutoModelForCausalLM

from teacher_cache.generation import Sampling, load_generator
from teacher_cache.sampling import eos_token_ids
from teacher_cache.teacher import TransformersTeacher

LENGTHS = (3, 19, 6, 11)  # prompt lengths: a batch of 4 mixes them, so rows are left-padded


@pytest.fixture(scope="module")
def generator(llama_dir):
    engine = load_generator("transformers", str(llama_dir), device="cpu", dtype="float32", batch_size=4,
                            tensor_parallel_size=1, gpu_memory_utilization=0.5, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(generator, corpus_texts) -> list[tuple[int, list[int]]]:
    """(prompt_id, tokens) of different lengths, with ids that are not their positions."""
    return [(100 + 7 * i, generator.tokenizer(text).input_ids[:n])
            for i, (text, n) in enumerate(zip(corpus_texts[3:7], LENGTHS, strict=True))]


def test_logprobs_equal_a_full_forward_and_the_sampling_distribution(generator, model, prompts):
    sampling = Sampling(num_responses=2, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=10, seed=3)
    responses = generator.generate(prompts, sampling)
    assert [(r.prompt_id, r.response_index) for r in responses] == [(p, i) for p, _ in prompts for i in range(2)]
    prompt_of = dict(prompts)
    for r in responses:
        assert r.finish_reason == "length" and len(r.token_ids) == 10
        logprobs_TV = model_logprobs(model, prompt_of[r.prompt_id], r.token_ids)
        drawn = np.arange(len(r.token_ids)), np.array(r.token_ids)
        np.testing.assert_allclose(r.logprobs, logprobs_TV[drawn], atol=1e-4)
        processed = np.stack([brute_processed(row, sampling) for row in logprobs_TV])
        np.testing.assert_allclose(r.sampling_logprobs, processed[drawn], atol=1e-4)
    # The cuts bite: the sampling distribution differs from the model's.
    assert not np.allclose(np.concatenate([r.logprobs for r in responses]),
                           np.concatenate([r.sampling_logprobs for r in responses]), atol=1e-2)


def test_greedy_is_the_argmax_loop_of_each_prompt_alone(generator, model, prompts):
    responses = generator.generate(prompts, Sampling(temperature=0, max_new_tokens=8))
    for (_, prompt), r in zip(prompts, responses, strict=True):
        assert r.token_ids == greedy_tokens(model, prompt, 8)
        assert r.finish_reason == "length"
        assert r.sampling_logprobs == [0.0] * 8
        np.testing.assert_allclose(r.logprobs, model_logprobs(model, prompt, r.token_ids)[np.arange(8), r.token_ids],
                                   atol=1e-4)
        assert r.text == after_prompt(generator.tokenizer, prompt, r.token_ids)


def test_positions_count_from_each_prompt_start_under_left_padding(gpt2_dir, prompts):
    """GPT-2's learned absolute positions (Llama's rotary ones are blind to a shift) must start at each prompt."""
    engine = load_generator("transformers", str(gpt2_dir), device="cpu", dtype="float32", batch_size=4,
                            tensor_parallel_size=1, gpu_memory_utilization=0.5, seed=0)
    reference = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    responses = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=6))
    for (_, prompt), r in zip(prompts, responses, strict=True):
        assert r.token_ids == greedy_tokens(reference, prompt, 6)
        np.testing.assert_allclose(r.logprobs, model_logprobs(reference, prompt, r.token_ids)[np.arange(6),
                                                                                                 r.token_ids],
                                   atol=1e-4)


def test_a_response_depends_on_its_seed_prompt_id_and_index_not_its_batch(generator, prompts):
    sampling = Sampling(num_responses=3, temperature=1.5, max_new_tokens=8, seed=11)
    together = by_key(generator.generate(prompts, sampling))
    alone = by_key([r for prompt in prompts for r in generator.generate([prompt], sampling)])
    reordered = by_key(generator.generate(prompts[::-1], sampling))
    generator.batch_size = 1
    try:
        one_by_one = by_key(generator.generate(prompts, sampling))
    finally:
        generator.batch_size = 4
    for other in (alone, reordered, one_by_one):
        assert other.keys() == together.keys()
        for key, r in together.items():
            assert other[key].token_ids == r.token_ids, key
            np.testing.assert_allclose(other[key].logprobs, r.logprobs, atol=1e-4)
    reseeded = by_key(generator.generate(prompts, Sampling(num_responses=3, temperature=1.5, max_new_tokens=8,
                                                            seed=12)))
    for key, r in together.items():
        assert reseeded[key].token_ids != r.token_ids, key
    for prompt_id, _ in prompts:
        drawn = {tuple(together[prompt_id, i].token_ids) for i in range(3)}
        assert len(drawn) == 3, prompt_id
    # The prompt id seeds the draws too: the same tokens under another id get other responses.
    renamed = generator.generate([(1, prompts[0][1])], sampling)
    assert renamed[0].token_ids != together[prompts[0][0], 0].token_ids


def _chi_square_bound(df: int, z: float = 4.5) -> float:
    """Upper tail of a chi-square with `df` degrees of freedom at about P(N(0,1) > z) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("sampling", [
    Sampling(num_responses=2000, temperature=1.0, max_new_tokens=1, seed=5),
    Sampling(num_responses=2000, temperature=2.5, max_new_tokens=1, seed=6),
    Sampling(num_responses=2000, temperature=1.7, top_k=12, top_p=0.8, max_new_tokens=1, seed=7),
], ids=["t1", "t2.5", "t1.7-k12-p0.8"])
def test_one_step_draws_follow_the_sampling_distribution(generator, model, prompts, sampling):
    prompt = prompts[2][1]
    generator.batch_size = 500
    try:
        responses = generator.generate([(0, prompt)], sampling)
    finally:
        generator.batch_size = 4
    counts = np.bincount([r.token_ids[0] for r in responses], minlength=generator.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    expected = sampling.num_responses * np.exp(brute_processed(torch.log_softmax(logits, -1).numpy(), sampling))
    assert counts[expected == 0].sum() == 0, "a draw outside the sampling distribution"
    big = expected >= 5
    observed_bins = np.append(counts[big], counts[~big].sum())
    expected_bins = np.append(expected[big], expected[~big].sum())
    if expected_bins[-1] == 0:
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    assert big.sum() >= 3, "the test prompt's distribution is too peaked to test the draws"
    chi_square = ((observed_bins - expected_bins) ** 2 / expected_bins).sum()
    assert chi_square < _chi_square_bound(len(expected_bins) - 1), (chi_square, len(expected_bins))


def test_a_prompt_without_room_for_the_reply_is_refused(generator):
    """An empty prompt, or one that leaves fewer than --max-new-tokens positions of the context, is a ValueError
    naming the prompt and the room it has."""
    sampling = Sampling(max_new_tokens=8)
    room = generator.max_context - 8
    with pytest.raises(ValueError, match=rf"prompt 7 has 0 tokens; the model takes 1 to {room} with --max-new-tokens"):
        generator.generate([(7, [])], sampling)
    with pytest.raises(ValueError, match=rf"prompt 9 has {room + 1} tokens; the model takes 1 to {room}"):
        generator.generate([(9, [5] * (room + 1))], sampling)


def test_stop_strings_cut_the_text_and_the_tokens(generator, prompts):
    prompt_id, prompt = prompts[1]
    full = generator.generate([(prompt_id, prompt)], Sampling(temperature=0, max_new_tokens=16))[0]
    tokenizer = generator.tokenizer
    assert full.text == after_prompt(tokenizer, prompt, full.token_ids)
    # Two stop strings completed by the same token, the second starting one character later: the first one cuts.
    cut = next(m for m in range(len(full.text) // 2, len(full.text) - 4)
               if full.text.find(full.text[m: m + 4]) == m and full.text.find(full.text[m + 1: m + 4]) == m + 1)
    stop = full.text[cut: cut + 4]
    completed = next(k for k in range(1, 17) if stop in after_prompt(tokenizer, prompt, full.token_ids[:k]))
    assert completed < len(full.token_ids)
    sampling = Sampling(temperature=0, max_new_tokens=16, stop=("not in the text at all", stop[1:], stop))
    r = generator.generate([(prompt_id, prompt)], sampling)[0]
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert r.token_ids == full.token_ids[:completed] and len(r.logprobs) == completed
    np.testing.assert_allclose(r.logprobs, full.logprobs[:completed], atol=1e-5)


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory, model, prompts):
    """The test model whose generation config adds an end-of-turn token: the 4th greedy token of the first prompt."""
    tokens = greedy_tokens(model, prompts[0][1], 8)
    assert tokens[3] not in tokens[:3] + [2]
    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(llama_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [2, tokens[3]]}))
    return path, tokens


def test_an_eos_token_of_the_generation_config_ends_a_response(chat_dir, model, prompts):
    path, greedy = chat_dir
    engine = load_generator("transformers", str(path), device="cpu", dtype="float32", batch_size=2,
                            tensor_parallel_size=1, gpu_memory_utilization=0.5, seed=0)
    assert engine.eos_ids == {2, greedy[3]}
    responses = engine.generate(prompts[:2], Sampling(temperature=0, max_new_tokens=8))
    r = responses[0]
    assert r.token_ids == greedy[:4] and r.finish_reason == "stop"
    assert r.text == after_prompt(engine.tokenizer, prompts[0][1], greedy[:3])  # the EOS token adds no text
    assert len(r.logprobs) == len(r.sampling_logprobs) == 4
    # The other sequence of the batch went on alone, to its own end.
    other = greedy_tokens(model, prompts[1][1], 8)
    if greedy[3] in other:
        other = other[: other.index(greedy[3]) + 1]
    assert responses[1].token_ids == other


def test_eos_tokens_without_a_generation_config_come_from_the_model_config(chat_dir, tmp_path, generator):
    path = tmp_path / "model"
    shutil.copytree(chat_dir[0], path)
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"eos_token_id": [5, 9]}))
    assert eos_token_ids(str(path), generator.tokenizer) == {2, 5, 9}  # the tokenizer's </s> and the config's


def test_identity_is_the_teacher_section_of_a_build(generator, llama_dir):
    assert generator.identity() == TransformersTeacher(str(llama_dir), device="cpu", dtype="float32").identity()
    assert generator.max_context == 512


@pytest.mark.parametrize(("options", "flag"), [
    ({"num_responses": 0}, "--num-responses"),
    ({"temperature": -0.5}, "--temperature"),
    ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -1}, "--top-k"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"stop": ("###", "")}, "--stop"),
])
def test_bad_sampling_values_name_their_option(options, flag):
    with pytest.raises(ValueError, match=f"^{flag}: expected"):
        Sampling(**options)


def test_manifest_entry_is_plain_json():
    sampling = Sampling(num_responses=2, temperature=0.7, top_p=0.95, top_k=20, max_new_tokens=64, seed=9,
                        stop=("\n\n", "###"))
    assert json.loads(json.dumps(sampling.manifest_entry())) == {
        "num_responses": 2, "temperature": 0.7, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64, "seed": 9,
        "stop": ["\n\n", "###"]}


def test_unknown_backend_and_missing_model_are_refused(tmp_path):
    options = dict(device="cpu", dtype="float32", batch_size=1, tensor_parallel_size=1, gpu_memory_utilization=0.5,
                   seed=0)
    with pytest.raises(ValueError, match="--backend: expected one of transformers, vllm, got 'tgi'"):
        load_generator("tgi", str(tmp_path), **options)
    with pytest.raises(ValueError, match="--model .*: no such directory"):
        load_generator("transformers", str(tmp_path / "missing"), **options)
