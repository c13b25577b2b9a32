"""`teacher-cache generate` end to end, through click's CliRunner: prompts of each shape become the right turns, the
stored log-probs are those of a plain forward, resume and workers write what one run writes, the filters drop and
count, bad input is refused with nothing written, and `build` + `student-train` read the output.

The model answers in words: a tiny random Llama whose output head can only give a few whole-word tokens and EOS
(`answerer`), so that a reply re-tokenizes to the very tokens generated and ends with EOS often enough. Expected
values come from the test's own chat-template rendering, plain full forwards and hand-made filters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_student_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import teacher_cache.cli as teacher_cli
from storage.generated import GeneratedWriter, read_generated
from storage.reader import Store
from student_train.cli import main as student_main
from teacher_cache.generate import GenerateConfig

EOS = 2
WORDS = ("cat dog sun moon tree house river stone light water fire green blue red small big old new good day night "
         "bird fish road city king queen song book door").split()
TEMPLATE = (  # Llama-2 style: a reply is its content then EOS, and the generation prompt ends with [/INST]
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Count to three.",
             "Tell me a story about a cat.", "Why is the sky blue?", "Explain gravity."]
SAMPLED = ["--num-responses", "3", "--max-new-tokens", "10", "--temperature", "1", "--batch-size", "4"]
GREEDY = ["--num-responses", "3", "--max-new-tokens", "8", "--temperature", "0"]
SHARDED = ["--num-responses", "2", "--max-new-tokens", "8", "--prompts-per-shard", "2", "--keep-truncated"]
WORKER_VARIABLES = ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_ARRAY_TASK_COUNT")


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def answerer(llama_dir, tmp_path_factory) -> Path:
    """The test Llama made to answer in words. Its embeddings get a constant feature that no layer writes to, so the
    final norm's first dimension is positive everywhere; the output head keeps the rows of WORDS and EOS (scaled down:
    varied draws) and puts every other token 200 x that feature below them."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    kept = [tokenizer.convert_tokens_to_ids("▁" + word) for word in WORDS] + [EOS]
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.05
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        head = model.get_output_embeddings().weight
        rows = head[kept] * 0.1
        rows[:, 0] = 0
        head.zero_()
        head[:, 0] = -200
        head[kept] = rows
    path = tmp_path_factory.mktemp("answerer") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(answerer):
    return AutoTokenizer.from_pretrained(answerer)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with the chat template and the prompts of the module's runs."""
    root = tmp_path_factory.mktemp("generate-data")
    (root / "template.jinja").write_text(TEMPLATE)
    _jsonl(root / "questions.jsonl", [{"prompt": q} for q in QUESTIONS])
    return root


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """No launcher's environment decides the workers."""
    for name in WORKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def generate(model: Path, prompts: Path, output: Path, *extra: str, template: Path | None = None):
    """`teacher-cache generate` on the CPU in float32, with the chat template `template`, then `extra`."""
    args = ["generate", "--model", str(model), "--prompts", str(prompts), "--output", str(output), "--device", "cpu",
            "--dtype", "float32", *(["--chat-template", str(template)] if template else []), *extra]
    return CliRunner().invoke(teacher_cli.main, args)


def _run(answerer, data, prompts, output, *extra):
    """`generate` with the module's template, which must succeed; the rows, the manifest and what it printed."""
    result = generate(answerer, prompts, output, *extra, template=data / "template.jinja")
    assert result.exit_code == 0, (result.output, result.exception)
    rows, manifest = read_generated(output)
    return rows.to_list(), manifest, result.output


def _prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
    """The tokens the model answers: the template's rendering with its generation prompt, whose special tokens are
    the template's own."""
    text = tokenizer.apply_chat_template(turns, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _reply_text(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text `tokens` add after the prompt (an EOS adds none)."""
    decoded = tokenizer.decode(prompt + tokens, skip_special_tokens=True)
    return decoded[len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def _question_turns(prompt_id: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[prompt_id]}]


def _summary(rows: int, prompts: int, dropped: str = "", skipped: str = "") -> str:
    return (f"{rows} responses to {prompts} prompts" + (f"; dropped {dropped} responses" if dropped else "")
            + (f"; skipped prompts: {skipped}" if skipped else ""))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_usage_error(result, *fragments: str) -> None:
    """Exit code 2 (click.UsageError), no traceback, and every fragment in the message."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


# 1. Prompts of each shape -> the turns answered ----------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Answer briefly."}
SHAPES = {
    # shape: (rows, options, the turns answered per row (None: a row without text))
    "messages": (
        [{"messages": [SYSTEM, {"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                       {"role": "assistant", "content": "Rome."}]},
         {"messages": [{"role": "user", "content": "Name a prime number."}]},
         {"messages": [{"role": "user", "content": "Count to three."},
                       {"role": "assistant", "content": "One, two, three."}]}],
        [],
        [[SYSTEM, {"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
         [{"role": "user", "content": "Name a prime number."}],
         [{"role": "user", "content": "Count to three."}]]),
    "prompt-only": (
        [{"prompt": "Why is the sky blue?"}, {"prompt": "Explain gravity."}],
        [],
        [[{"role": "user", "content": "Why is the sky blue?"}], [{"role": "user", "content": "Explain gravity."}]]),
    "prompt-completion": (
        [{"prompt": [SYSTEM, {"role": "user", "content": "What is two plus two?"}],
          "completion": [{"role": "assistant", "content": "Four."}]},
         {"prompt": [{"role": "user", "content": "Write a haiku."}],
          "completion": [{"role": "assistant", "content": "Old pond, a frog."}]}],
        [],
        [[SYSTEM, {"role": "user", "content": "What is two plus two?"}],
         [{"role": "user", "content": "Write a haiku."}]]),
    "text": (
        [{"text": "def f(x): return x + 1"}, {"text": ""}, {"text": "  \n "}, {"text": "SELECT * FROM t;"}],
        ["--prompt-template", "Explain:\n\n{text}"],
        [[{"role": "user", "content": "Explain:\n\ndef f(x): return x + 1"}], None, None,
         [{"role": "user", "content": "Explain:\n\nSELECT * FROM t;"}]]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_prompt_shape_is_answered_after_its_turns(shape, answerer, data, tokenizer, tmp_path):
    rows, options, expected = SHAPES[shape]
    prompts = _jsonl(tmp_path / "prompts.jsonl", rows)
    got, manifest, output = _run(answerer, data, prompts, tmp_path / "out", "--num-responses", "2",
                                 "--max-new-tokens", "8", "--keep-truncated", "--keep-duplicates", *options)
    answered = [i for i, turns in enumerate(expected) if turns is not None]
    assert [(r["prompt_id"], r["response_index"]) for r in got] == [(i, j) for i in answered for j in range(2)]
    for row in got:
        turns = expected[row["prompt_id"]]
        prompt = _prompt_ids(tokenizer, turns)
        assert row["prompt_tokens"] == len(prompt)
        reply = _reply_text(tokenizer, prompt, row["response_token_ids"])
        assert row["messages"] == [*turns, {"role": "assistant", "content": reply}]
        assert reply.strip()
    empty = len(expected) - len(answered)
    assert manifest["counts"]["prompts"] == len(expected) and manifest["counts"]["empty_prompts"] == empty
    assert manifest["rows"] == len(got) == 2 * len(answered)
    skipped = f"{empty} without text" if empty else ""
    assert f"Wrote {_summary(len(got), len(expected), skipped=skipped)} to {tmp_path / 'out'}." in output


# 2. The stored log-probs against a plain forward -----------------------------------------------------------------


@pytest.fixture(scope="module")
def unfiltered(answerer, data, tmp_path_factory):
    """Three sampled responses to each question, all kept: (rows, manifest)."""
    output = tmp_path_factory.mktemp("unfiltered") / "out"
    rows, manifest, _ = _run(answerer, data, data / "questions.jsonl", output, *SAMPLED, "--keep-truncated",
                             "--keep-duplicates")
    return rows, manifest


def test_response_logprobs_equal_a_full_forward(unfiltered, answerer, tokenizer):
    rows, _ = unfiltered
    assert len(rows) == 3 * len(QUESTIONS)
    model = AutoModelForCausalLM.from_pretrained(answerer, dtype=torch.float32).eval()
    for row in rows:
        prompt, tokens = _prompt_ids(tokenizer, _question_turns(row["prompt_id"])), row["response_token_ids"]
        with torch.no_grad():
            logits_TV = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
        expected = logits_TV.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()
        np.testing.assert_allclose(row["response_logprobs"], expected, atol=1e-4)
        # temperature 1, no top-k or top-p: drawn from the model's own distribution
        np.testing.assert_allclose(row["sampling_logprobs"], expected, atol=1e-4)


# 3. and 4. Resume and workers write what one run writes ----------------------------------------------------------


@pytest.fixture(scope="module")
def clean(answerer, data, tmp_path_factory):
    """An uninterrupted run over the questions in 3 shards of 2 prompts: (rows, manifest)."""
    rows, manifest, _ = _run(answerer, data, data / "questions.jsonl",
                             tmp_path_factory.mktemp("clean") / "out", *SHARDED)
    return rows, manifest


def _same_output(output: Path, clean) -> None:
    rows, manifest = read_generated(output)
    assert rows.to_list() == clean[0]
    assert manifest["counts"] == clean[1]["counts"] and manifest["rows"] == clean[1]["rows"]


def test_resume_after_a_kill_equals_an_uninterrupted_run(answerer, data, clean, tmp_path, monkeypatch):
    output = tmp_path / "out"
    original, written = GeneratedWriter.write_shard, []

    def killed_after_the_first_shard(self, shard, rows, counts):
        original(self, shard, rows, counts)
        written.append(shard)
        if len(written) == 1:
            raise Killed

    monkeypatch.setattr(GeneratedWriter, "write_shard", killed_after_the_first_shard)
    result = generate(answerer, data / "questions.jsonl", output, *SHARDED, template=data / "template.jinja")
    assert isinstance(result.exception, Killed) and written == [0]
    assert not (output / "generation.json").exists() and not (output / "data" / "shard-00001.json").exists()
    first = output / "data" / "shard-00000.parquet"
    before, stat = first.read_bytes(), first.stat()

    _run(answerer, data, data / "questions.jsonl", output, *SHARDED, "--resume")
    assert written == [0, 1, 2]  # the committed shard is not written again
    after = first.stat()
    assert first.read_bytes() == before and (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    _same_output(output, clean)


def test_two_workers_write_what_one_process_writes(answerer, data, clean, tmp_path, monkeypatch, caplog):
    """Worker 0 of 2 owns shards 0 and 2 of the 3; it is killed after its first, resumed, then worker 1 finishes."""
    caplog.set_level(logging.INFO, logger="teacher_cache.generate")
    output, template = tmp_path / "out", data / "template.jinja"
    worker = ["--num-workers", "2", "--worker-index"]
    original = GeneratedWriter.write_shard

    def killed_after_shard_0(self, shard, rows, counts):
        original(self, shard, rows, counts)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(GeneratedWriter, "write_shard", killed_after_shard_0)
        killed = generate(answerer, data / "questions.jsonl", output, *SHARDED, *worker, "0", template=template)
    assert isinstance(killed.exception, Killed)
    first = generate(answerer, data / "questions.jsonl", output, *SHARDED, *worker, "0", "--resume",
                     template=template)
    assert first.exit_code == 0, first.output
    assert "resuming: 1 of this worker's shards are written already" in caplog.text
    assert f"Worker 0 of 2 wrote its shards to {output}; the last worker to finish writes generation.json" in \
        first.output
    assert sorted(p.name for p in (output / "data").glob("*.parquet")) == ["shard-00000.parquet", "shard-00002.parquet"]
    assert not (output / "generation.json").exists()
    second = generate(answerer, data / "questions.jsonl", output, *SHARDED, *worker, "1", template=template)
    assert second.exit_code == 0, second.output
    assert f"Wrote {_summary(clean[1]['rows'], len(QUESTIONS))} to {output}." in second.output
    assert (output / "generation.json").exists()
    _same_output(output, clean)


# 5. Filters --------------------------------------------------------------------------------------------------------


def _filtered_by_hand(rows: list[dict]) -> tuple[list[dict], dict]:
    """The rows the default filters keep, and the counts they drop: an empty reply, then one cut at the length limit,
    then one whose text an earlier response to the same prompt had."""
    kept, counts, seen = [], {"empty": 0, "truncated": 0, "duplicate": 0}, {}
    for row in rows:
        text = row["messages"][-1]["content"]
        earlier = seen.setdefault(row["prompt_id"], set())
        reason = ("empty" if not text.strip() else "truncated" if row["finish_reason"] == "length" else
                  "duplicate" if text in earlier else None)
        earlier.add(text)
        if reason:
            counts[reason] += 1
        else:
            kept.append(row)
    return kept, counts


@pytest.fixture(scope="module")
def filtered(answerer, data, tmp_path_factory):
    """`unfiltered`'s run with the default filters: (rows, manifest, command output, output directory)."""
    output = tmp_path_factory.mktemp("filtered") / "out"
    rows, manifest, printed = _run(answerer, data, data / "questions.jsonl", output, *SAMPLED)
    return rows, manifest, printed, output


def test_truncated_responses_are_dropped_and_counted(unfiltered, filtered):
    every, _ = unfiltered
    for row in every:  # what "truncated" means, checked on the tokens
        if row["finish_reason"] == "length":
            assert len(row["response_token_ids"]) == 10 and EOS not in row["response_token_ids"]
        else:
            assert row["finish_reason"] == "stop" and row["response_token_ids"].index(EOS) == \
                len(row["response_token_ids"]) - 1
    truncated = [row for row in every if row["finish_reason"] == "length"]
    assert 0 < len(truncated) < len(every), "the test model should finish some responses and not others"
    kept, counts = _filtered_by_hand(every)
    rows, manifest, printed, output = filtered
    assert rows == kept and all(row["finish_reason"] == "stop" for row in rows)
    assert counts["truncated"] == len(truncated)
    assert {key: manifest["counts"][key] for key in counts} == counts
    assert manifest["counts"]["responses"] == len(every) and manifest["rows"] == len(kept)
    dropped = ", ".join(f"{n} {key}" for key, n in counts.items() if n)
    assert f"Wrote {_summary(len(kept), len(QUESTIONS), dropped=dropped)} to {output}." in printed


def test_rollouts_keep_every_response(answerer, data, tmp_path):
    """With every --keep-* flag nothing is dropped: a reply whose first word is a stop string has no text, and is
    kept as drawn (on-policy rollouts must be the model's samples, unfiltered)."""
    prompts, keep = data / "questions.jsonl", ["--keep-truncated", "--keep-duplicates"]
    stops = [arg for word in WORDS[:10] for arg in ("--stop", word)]
    dropped, manifest, _ = _run(answerer, data, prompts, tmp_path / "dropped", *SAMPLED, *stops, *keep)
    assert manifest["counts"]["empty"] > 0, "the test model should give some replies without text"
    rows, kept_manifest, _ = _run(answerer, data, prompts, tmp_path / "kept", *SAMPLED, *stops, *keep, "--keep-empty")
    assert len(rows) == kept_manifest["counts"]["responses"] == 3 * len(QUESTIONS)
    assert kept_manifest["counts"]["empty"] == 0 and kept_manifest["filters"]["keep_empty"] is True
    assert [r for r in rows if r["messages"][-1]["content"].strip()] == dropped
    assert len(rows) - len(dropped) == manifest["counts"]["empty"]


def test_greedy_repeats_are_duplicates(answerer, data, tmp_path):
    prompts = data / "questions.jsonl"
    kept, manifest, printed = _run(answerer, data, prompts, tmp_path / "dedup", *GREEDY, "--keep-truncated")
    every, _, _ = _run(answerer, data, prompts, tmp_path / "all", *GREEDY, "--keep-truncated", "--keep-duplicates")
    assert [(r["prompt_id"], r["response_index"]) for r in every] == [(i, j) for i in range(6) for j in range(3)]
    for prompt_id in range(len(QUESTIONS)):
        texts = {row["messages"][-1]["content"] for row in every if row["prompt_id"] == prompt_id}
        assert len(texts) == 1 and next(iter(texts)).strip()  # greedy: the same reply, three times
    assert kept == [row for row in every if row["response_index"] == 0]
    assert manifest["counts"]["duplicate"] == 2 * len(QUESTIONS) and manifest["counts"]["responses"] == 18
    assert f"Wrote {_summary(6, 6, dropped='12 duplicate')} to {tmp_path / 'dedup'}." in printed


def test_a_prompt_too_long_for_the_context_is_skipped_and_counted(answerer, data, tokenizer, tmp_path):
    long_text = " ".join(["the cat sat on the mat"] * 100)
    assert len(_prompt_ids(tokenizer, [{"role": "user", "content": long_text}])) > 512 - 8  # the model's context
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"text": "Short one."}, {"text": long_text}])
    rows, manifest, printed = _run(answerer, data, prompts, tmp_path / "out", "--max-new-tokens", "8",
                                   "--keep-truncated", "--format", "text")
    assert {row["prompt_id"] for row in rows} == {0}
    assert manifest["counts"]["long_prompts"] == 1 and manifest["counts"]["prompts"] == 2
    assert f"; skipped prompts: 1 too long for the context to {tmp_path / 'out'}." in printed


# 6. Bad input ------------------------------------------------------------------------------------------------------

GOOD = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:2]]
NO_USER = {"messages": [SYSTEM, {"role": "assistant", "content": "Hello."}]}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}
WITH_TOOL_CALLS = {"messages": [{"role": "user", "content": "Add two."},
                                {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                                {"role": "tool", "content": "4"}, {"role": "user", "content": "Thanks. And now?"}]}


@pytest.mark.parametrize(("rows", "extra", "fragments"), [
    ([{"prompt": "Hi."}], ["--num-responses", "0"], ["--num-responses: expected an integer >= 1, got 0"]),
    ([{"text": "x = 1"}], ["--prompt-template", "Explain this code."],
     ["--prompt-template 'Explain this code.' has no {text}", "put {text} where each row's text goes"]),
    (GOOD, ["--prompt-template", "Explain: {text}"],
     ["--prompt-template", "is read as messages", "use it with text rows (--format text), or leave it out"]),
    # the bad row comes after good ones, whose shards would be written first
    ([*GOOD, NO_USER], [], ["row 2 has no user turn to answer", "give each prompt a user turn, or remove the row"]),
    ([*GOOD, WITH_TOOL_CALLS], [], ["row 2, message 1 carries tool_calls", "Remove those keys (or the turn)"]),
], ids=["num-responses", "template-without-slot", "template-with-messages", "no-user-turn", "tool-calls"])
def test_bad_input_is_refused_before_anything_is_written(rows, extra, fragments, answerer, data, tmp_path):
    prompts = _jsonl(tmp_path / "prompts.jsonl", rows)
    result = generate(answerer, prompts, tmp_path / "out", "--max-new-tokens", "4", "--prompts-per-shard", "1",
                      *extra, template=data / "template.jinja")
    assert_usage_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_chat_template_needs_one(answerer, data, tmp_path):
    result = generate(answerer, data / "questions.jsonl", tmp_path / "out", "--max-new-tokens", "4")
    assert_usage_error(result, "the tokenizer has no chat template", "pass --chat-template FILE")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def finished(answerer, data, tmp_path) -> Path:
    output = tmp_path / "out"
    _run(answerer, data, data / "questions.jsonl", output, *SHARDED)
    return output


def test_an_existing_output_needs_resume(answerer, data, finished):
    before = snapshot(finished)
    result = generate(answerer, data / "questions.jsonl", finished, *SHARDED, template=data / "template.jinja")
    assert_usage_error(result, "already holds a `teacher-cache generate` output", "Pass --resume to continue it")
    assert snapshot(finished) == before


def test_resume_with_another_temperature_is_refused(answerer, data, finished):
    before = snapshot(finished)
    result = generate(answerer, data / "questions.jsonl", finished, *SHARDED, "--temperature", "0.5", "--resume",
                      template=data / "template.jinja")
    assert_usage_error(result, "it was started with other options", "sampling.temperature",
                       "Use the options it was started with")
    assert snapshot(finished) == before


# 7. build and student-train over the output ------------------------------------------------------------------------


def test_build_trains_on_the_generated_tokens_and_records_their_writer(answerer, data, filtered, tmp_path):
    rows, manifest, _, output = filtered
    store_dir = tmp_path / "store"
    result = CliRunner().invoke(teacher_cli.main, [
        "build", "--model", str(answerer), "--dataset", str(output), "--output", str(store_dir), "--chat-template",
        str(data / "template.jinja"), "--seq-len", "64", "--targets", "topk", "--top-k", "8", "--no-pack",
        "--device", "cpu", "--dtype", "float32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    store = Store(store_dir)
    written_by = store.manifest.dataset["generated_by"]
    assert written_by["model"] == str(answerer.resolve()) and written_by["backend"] == "transformers"
    assert written_by["sampling"] == {"num_responses": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                      "max_new_tokens": 10, "seed": 0, "stop": []}
    assert written_by["manifest_sha256"] == manifest["manifest_sha256"]
    assert len(store) == len(rows) > 0  # one conversation per sample (--no-pack), in the output's order
    for i, row in enumerate(rows):
        sample = store[i]
        trained = sample["input_ids"][1:][sample["loss_mask"]]
        assert trained.tolist() == row["response_token_ids"], i  # the reply's tokens, its EOS included

    student = make_student_config(tmp_path / "student", answerer)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(student)
    trained = CliRunner().invoke(student_main, [
        "--store", str(store_dir), "--student", str(student), "--output", str(tmp_path / "run"), "--max-steps", "2",
        "--batch-size", "2", "--eval-fraction", "0.25", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output


# 8. Options from a YAML file -----------------------------------------------------------------------------------------


def test_print_config_reads_back_through_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(teacher_cli, "generate_responses",
                        lambda config: seen.append(config) or {"rows": 0, "counts": {"prompts": 0}})
    args = ["generate", "--model", "m", "--prompts", "p.jsonl", "--output", "o", "--num-responses", "4",
            "--temperature", "0.7", "--stop", "###", "--stop", "\n\n", "--prompt-template", "Q: {text}",
            "--keep-truncated", "--device", "cpu"]
    printed = CliRunner().invoke(teacher_cli.main, [*args, "--print-config"])
    assert printed.exit_code == 0 and not seen, printed.output
    values = yaml.safe_load(printed.output)
    assert (values["num_responses"], values["temperature"], values["stop"], values["prompt_template"],
            values["keep_truncated"], values["max_new_tokens"]) == (4, 0.7, ["###", "\n\n"], "Q: {text}", True, 256)
    config_file = tmp_path / "generate.yaml"
    config_file.write_text(printed.output)
    again = CliRunner().invoke(teacher_cli.main, ["generate", "--config", str(config_file), "--print-config"])
    assert again.exit_code == 0 and again.output == printed.output, again.output
    result = CliRunner().invoke(teacher_cli.main, ["generate", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert seen == [GenerateConfig(model="m", prompts="p.jsonl", output="o", num_responses=4, temperature=0.7,
                                   stop=("###", "\n\n"), prompt_template="Q: {text}", keep_truncated=True,
                                   device="cpu")]
