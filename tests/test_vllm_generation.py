"""The vLLM generation engine against a transformers forward of the same weights, on one shared engine.

One tiny Llama (head size 32, the smallest vLLM's CPU attention takes) is served by one vLLM engine for the whole
module (starting one costs ~20-50 s). Its generation config adds an end-of-turn token (the 4th greedy token of the
first prompt), as chat models do. Responses must not depend on their batch, their log-probs must be the model's
own (a plain transformers forward over prompt + response, computed here in float64), and the sampling log-probs the
distribution computed here by brute force.

vLLM is optional: without it these tests skip, naming the reason, except where TEACHER_CACHE_REQUIRE_VLLM=1 (CI
sets it), where its absence is a failure.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import make_llama, require_vllm
from generation_reference import after_prompt, brute_processed, by_key, greedy_tokens, model_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_cache.generation import Sampling, load_generator
from teacher_cache.vllm_generation import _step_values

require_vllm("the vllm generation engine")

LENGTHS = (5, 17, 9, 12)
STEPS = 8


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, corpus_texts):
    """(model directory, transformers model, prompts, the first prompt's greedy tokens); the directory's generation
    config ends a turn on the 4th of those tokens."""
    path = make_llama(tmp_path_factory.mktemp("llama-h32"), heads=2, kv_heads=1, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = corpus_texts[5: 5 + len(LENGTHS)]
    prompts = [(40 + i, tokenizer(text).input_ids[:n]) for i, (text, n) in enumerate(zip(texts, LENGTHS, strict=True))]
    greedy = greedy_tokens(model, prompts[0][1], STEPS)
    assert greedy[3] not in greedy[:3] + [2]
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [2, greedy[3]]}))
    return path, model, prompts, greedy


@pytest.fixture(scope="module")
def engine(chat_model):
    generator = load_generator("vllm", str(chat_model[0]), device="cpu", dtype="float32", batch_size=1,
                               tensor_parallel_size=1, gpu_memory_utilization=0.3, seed=0)
    yield generator
    generator.close()


def test_responses_do_not_depend_on_the_batch(engine, chat_model):
    prompts = chat_model[2]
    sampling = Sampling(num_responses=2, temperature=1.3, max_new_tokens=STEPS, seed=4)
    together = by_key(engine.generate(prompts, sampling))
    alone = by_key([r for prompt in prompts for r in engine.generate([prompt], sampling)])
    reordered = by_key(engine.generate(prompts[::-1], sampling))
    for other in (alone, reordered):
        assert other.keys() == together.keys()
        for key, r in together.items():
            assert other[key].token_ids == r.token_ids, key
            np.testing.assert_allclose(other[key].logprobs, r.logprobs, atol=1e-4)
    reseeded = by_key(engine.generate(prompts, Sampling(num_responses=2, temperature=1.3, max_new_tokens=STEPS,
                                                         seed=5)))
    for key, r in together.items():
        assert reseeded[key].token_ids != r.token_ids, key
    for prompt_id, _ in prompts:
        assert together[prompt_id, 0].token_ids != together[prompt_id, 1].token_ids, prompt_id


@pytest.mark.parametrize("sampling", [
    Sampling(num_responses=2, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=STEPS, seed=6),
    Sampling(num_responses=2, temperature=1.3, top_k=5, max_new_tokens=STEPS, seed=7),
], ids=["t0.8-k20-p0.9", "t1.3-k5"])
def test_logprobs_are_the_models_and_sampling_logprobs_the_cut_distribution(engine, chat_model, sampling):
    _, model, prompts, _ = chat_model
    responses = engine.generate(prompts, sampling)
    assert [(r.prompt_id, r.response_index) for r in responses] == [(p, i) for p, _ in prompts for i in range(2)]
    prompt_of = dict(prompts)
    for r in responses:
        logprobs_TV = model_logprobs(model, prompt_of[r.prompt_id], r.token_ids)
        drawn = np.arange(len(r.token_ids)), np.array(r.token_ids)
        # vLLM's CPU kernels and transformers' differ in summation order: fp32 noise, far below a real difference.
        np.testing.assert_allclose(r.logprobs, logprobs_TV[drawn], atol=1e-4)
        processed = np.stack([brute_processed(row, sampling) for row in logprobs_TV])
        np.testing.assert_allclose(r.sampling_logprobs, processed[drawn], atol=1e-4)
        assert r.text == after_prompt(engine.tokenizer, prompt_of[r.prompt_id],
                                       r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids)
    assert not np.allclose(np.concatenate([r.logprobs for r in responses]),
                           np.concatenate([r.sampling_logprobs for r in responses]), atol=1e-2)


def test_sampling_logprobs_where_the_raw_ones_do_not_give_them(engine, chat_model):
    prompts = chat_model[2][:2]
    plain = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=4, seed=1))
    assert all(r.sampling_logprobs == r.logprobs for r in plain)
    nucleus = engine.generate(prompts, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=4, seed=1))
    assert all(r.sampling_logprobs is None and len(r.logprobs) == len(r.token_ids) for r in nucleus)


def test_greedy_is_the_argmax_loop_and_ends_on_the_end_of_turn_token(engine, chat_model):
    _, model, prompts, greedy = chat_model
    responses = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=STEPS))
    first = responses[0]
    assert first.token_ids == greedy[:4] and first.finish_reason == "stop"
    assert first.text == after_prompt(engine.tokenizer, prompts[0][1], greedy[:3])  # the EOS token adds no text
    assert first.sampling_logprobs == [0.0] * 4
    lengths = 0
    for (_, prompt), r in zip(prompts[1:], responses[1:], strict=True):
        expected = greedy_tokens(model, prompt, STEPS)
        if greedy[3] in expected:
            expected = expected[: expected.index(greedy[3]) + 1]
        assert r.token_ids == expected
        assert r.finish_reason == ("length" if len(expected) == STEPS and expected[-1] != greedy[3] else "stop")
        lengths += r.finish_reason == "length"
    assert lengths >= 1


def test_stop_strings_cut_the_text_and_the_tokens(engine, chat_model):
    prompt_id, prompt = chat_model[2][1]
    full = engine.generate([(prompt_id, prompt)], Sampling(temperature=0, max_new_tokens=12))[0]
    middle = len(full.text) // 2
    stop = full.text[middle: middle + 3]
    cut = full.text.find(stop)
    completed = next(k for k in range(1, 13)
                     if stop in after_prompt(engine.tokenizer, prompt, full.token_ids[:k]))
    assert 0 < cut and completed < len(full.token_ids)
    r = engine.generate([(prompt_id, prompt)], Sampling(temperature=0, max_new_tokens=12, stop=("@@@", stop)))[0]
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert r.token_ids == full.token_ids[:completed]


def test_identity_names_the_vllm_backend(engine, chat_model):
    identity = engine.identity()
    assert identity["backend"] == "vllm" and identity["model"] == str(chat_model[0].resolve())
    assert identity["dtype"] == "float32" and identity["vocab_size"] == 32000
    assert engine.max_context == 512


def test_list_container_of_older_releases_gives_the_flat_layout():
    """Releases without flat log-probs return {id: Logprob} per step, the drawn token only once."""

    def lp(value, rank):
        return types.SimpleNamespace(logprob=value, rank=rank)

    steps = [
        {7: lp(-0.5, 1), 3: lp(-1.5, 2)},  # drawn token 3 inside the top-2
        {9: lp(-4.0, 5), 2: lp(-0.1, 1), 7: lp(-2.6, 2)},  # drawn token 9 outside, rank 5
    ]
    np.testing.assert_allclose(_step_values(steps, [3, 9], 2), [[-1.5, -0.5, -1.5], [-4.0, -0.1, -2.6]])


LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
          "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
          "{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_generate_build_and_train_from_the_cli(engine, chat_model, tmp_path, monkeypatch):
    """`teacher-cache generate --backend vllm` -> `build` -> `student-train`: the command runs on the module's
    engine (a second engine would cost another start), the rows carry vLLM's log-probs of a plain forward, the store
    records the generator, and a student trains on it."""
    from click.testing import CliRunner
    from conftest import make_student_config

    import teacher_cache.generate as generate_module
    from storage.generated import read_generated
    from storage.reader import Store
    from student_train.cli import main as student_main
    from teacher_cache.cli import main as teacher_main

    path, model, _, _ = chat_model
    asked = []
    monkeypatch.setattr(generate_module, "load_generator", lambda backend, *a, **k: asked.append(backend) or engine)
    monkeypatch.setattr(engine, "close", lambda: None)  # the module's other tests go on with it
    (tmp_path / "llama2.jinja").write_text(LLAMA2)
    prompts = ["What is the capital of France?", "Name a prime number.", "Count to three.", "Why is the sky blue?"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    template = ["--chat-template", str(tmp_path / "llama2.jinja")]
    result = CliRunner().invoke(teacher_main, [
        "generate", "--model", str(path), "--prompts", str(tmp_path / "prompts.jsonl"), "--output",
        str(tmp_path / "answers"), "--backend", "vllm", "--num-responses", "2", "--max-new-tokens", "6",
        "--keep-truncated", "--seed", "3", *template])
    assert result.exit_code == 0, result.output
    assert asked == ["vllm"] and "Wrote 8 responses to 4 prompts" in result.output
    rows, manifest = read_generated(tmp_path / "answers")
    assert manifest["generator"]["backend"] == "vllm"
    tokenizer = engine.tokenizer
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], chat_template=LLAMA2, tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(ids) == row["prompt_tokens"]
        logprobs_TV = model_logprobs(model, ids, row["response_token_ids"])
        expected = logprobs_TV[np.arange(len(ids := row["response_token_ids"])), ids]
        np.testing.assert_allclose(row["response_logprobs"], expected, atol=1e-4)

    build = CliRunner().invoke(teacher_main, [
        "build", "--model", str(path), "--dataset", str(tmp_path / "answers"), "--output", str(tmp_path / "store"),
        "--seq-len", "64", "--targets", "topk", "--top-k", "4", "--device", "cpu", "--dtype", "float32", *template])
    assert build.exit_code == 0, build.output
    generated_by = Store(tmp_path / "store").manifest.dataset["generated_by"]
    assert generated_by["backend"] == "vllm" and generated_by["sampling"]["seed"] == 3
    student = make_student_config(tmp_path / "student", path)
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    student_tokenizer.chat_template = LLAMA2
    student_tokenizer.save_pretrained(student)
    train = CliRunner().invoke(student_main, [
        "--store", str(tmp_path / "store"), "--student", str(student), "--output", str(tmp_path / "run"),
        "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.25", "--device", "cpu"])
    assert train.exit_code == 0, train.output


def test_prompts_beyond_one_engine_step_keep_their_seeds(engine, chat_model, corpus_texts):
    """More prompt tokens than vLLM's default step budget on CPU (4096): vLLM would split a prefill across steps and
    rewind the seeded request's generator, which a CPU generator cannot do. Every prompt is prefilled whole instead,
    and a response is still the one its prompt gets alone."""
    tokenizer = engine.tokenizer
    text = " ".join(corpus_texts)
    ids = tokenizer(text).input_ids * 3
    prompts = [(i, ids[500 * i: 500 * i + 500]) for i in range(24)]
    assert sum(len(p) for _, p in prompts) > 4096 and all(len(p) == 500 for _, p in prompts)
    sampling = Sampling(temperature=1.0, max_new_tokens=4, seed=2)
    together = by_key(engine.generate(prompts, sampling))
    for prompt in prompts[::5]:
        alone = by_key(engine.generate([prompt], sampling))
        assert alone[prompt[0], 0].token_ids == together[prompt[0], 0].token_ids
