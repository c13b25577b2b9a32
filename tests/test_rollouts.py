"""A build over a `teacher-cache generate` output written with the teacher's tokenizer (storage/rollouts.py): the
samples hold the very tokens the generator read and drew (a non-canonical split of a word included), the reply's
tokens are trained, and the store keeps each drawn token's behaviour log-prob; otherwise the text is tokenized again.

Generated outputs are written by hand (GeneratedWriter, rows made here); expected samples are laid out by hand from
those rows, and the teacher's log-probs come from a plain forward of the tiny Llama.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import teacher_cache.cli as teacher_cli
from storage.conversations import template_sha256
from storage.generated import GeneratedWriter
from storage.identity import tokenizer_fingerprint
from storage.integrity import canonical_digest
from storage.reader import Store
from student_train.cli import main as student_main

EOS = 2
TEMPLATE = (  # Llama-2 style: a reply is its content then EOS, and the generation prompt ends with [/INST]
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PLAIN = {"num_responses": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "seed": 0,
         "stop": []}


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def _pieces(tokenizer, *pieces: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(pieces))


def _prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], chat_template=TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _replies(tokenizer) -> list[dict]:
    """(question, reply ids, finish reason): "cat" split as ▁c + at (never the tokenizer's split of " cat"), a
    reply cut at the token limit (no EOS), and an ordinary one."""
    return [
        {"question": "What purrs?", "reply": _pieces(tokenizer, "▁c", "at", "▁is", "▁small") + [EOS],
         "finish": "stop"},
        {"question": "Name two animals.", "reply": _pieces(tokenizer, "▁dog", "▁and", "▁bird"), "finish": "length"},
        {"question": "Say hi.", "reply": _pieces(tokenizer, "▁hi") + [EOS], "finish": "stop"},
    ]


def _rows(tokenizer, *, sampling_logprobs: bool = True) -> list[dict]:
    rows = []
    for prompt_id, spec in enumerate(_replies(tokenizer)):
        prompt, reply = _prompt(tokenizer, spec["question"]), spec["reply"]
        n = len(reply)
        rows.append({
            "messages": [{"role": "user", "content": spec["question"]},
                         {"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)}],
            "prompt_id": prompt_id, "response_index": 0, "finish_reason": spec["finish"],
            "response_token_ids": reply,
            "response_logprobs": [-0.5 * (i + 1) for i in range(n)],  # exact in float32
            "sampling_logprobs": [-0.25 * (i + 1) - prompt_id for i in range(n)] if sampling_logprobs else None,
            "prompt_tokens": len(prompt), "prompt_token_ids": prompt,
        })
    return rows


def write_generated(out: Path, rows: list[dict], *, tokenizer_sha256: str, sampling: dict = PLAIN) -> Path:
    header = {"generator": {"model": "student", "backend": "transformers", "weights_sha256": None,
                            "tokenizer_sha256": tokenizer_sha256},
              "sampling": sampling, "chat_template_sha256": template_sha256(TEMPLATE),
              "filters": {"keep_truncated": True, "keep_duplicates": True}}
    with GeneratedWriter.open(str(out), header, resume=False, prompts_per_shard=2, num_prompts=len(rows)) as writer:
        for shard in writer.pending():
            shard_rows = [r for r in rows if r["prompt_id"] in writer.shard_prompts(shard)]
            writer.write_shard(shard, shard_rows, {"responses": len(shard_rows)})
        assert writer.finish() is not None
    return out


def build(llama_dir, dataset: Path, output: Path, *extra: str):
    result = CliRunner().invoke(teacher_cli.main, [
        "build", "--model", str(llama_dir), "--dataset", str(dataset), "--output", str(output), "--targets", "topk",
        "--top-k", "4", "--device", "cpu", "--dtype", "float32", "--batch-size", "2", *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    return Store(output)


def _laid_out(row: dict, train_all: bool = False) -> tuple[list[int], list[bool], list[float]]:
    """The document a row must become: prompt then reply ids, EOS appended (untrained, not drawn) when missing."""
    prompt, reply = row["prompt_token_ids"], row["response_token_ids"]
    drawn = row["sampling_logprobs"] or row["response_logprobs"]
    ids, trained, behaviour = prompt + reply, [train_all] * len(prompt) + [True] * len(reply), [np.nan] * len(
        prompt) + drawn
    if reply[-1] != EOS:
        ids, trained, behaviour = ids + [EOS], trained + [False], behaviour + [np.nan]
    return ids, trained, behaviour


def test_the_split_is_not_the_tokenizers(tokenizer):
    """The case the rollouts exist for: tokenizing the reply's text again gives other tokens than were drawn."""
    row = _rows(tokenizer)[0]
    again = tokenizer(row["messages"][-1]["content"], add_special_tokens=False).input_ids
    assert again != row["response_token_ids"][:-1]


def test_unpacked_samples_hold_the_drawn_tokens_and_their_behaviour_logprobs(llama_dir, tokenizer, tmp_path):
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack")
    manifest = store.manifest
    assert manifest.dataset["format"] == "rollouts" and manifest.dataset["behaviour"] == "sampling_logprobs"
    assert manifest.targets["rollout"]["generated_by"]["model"] == "student"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    assert len(store) == len(rows)
    for i, row in enumerate(rows):
        ids, trained, behaviour = _laid_out(row)
        sample = store[i]
        n = len(ids)
        assert sample["input_ids"][:n].tolist() == ids
        assert sample["loss_mask"][: n - 1].tolist() == trained[1:] and not sample["loss_mask"][n - 1:].any()
        np.testing.assert_array_equal(sample["behaviour_logprob"][: n - 1], np.array(behaviour[1:], np.float32))
        assert np.isnan(sample["behaviour_logprob"][n - 1:]).all()
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        teacher = logp[torch.arange(n - 1), torch.tensor(ids[1:])].numpy()
        mask = np.array(trained[1:])
        np.testing.assert_allclose(sample["true_logprob"][: n - 1][mask], teacher[mask], atol=1e-4)


def test_packed_samples_cut_the_stream_of_rollouts(llama_dir, tokenizer, tmp_path):
    """Packed, every target once; a rollout cut across two samples keeps no behaviour log-probs in the second, where
    its tokens are read without the start they were drawn after."""
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    seq_len = 24  # longer than each rollout (a longer one is truncated, as a conversation is), shorter than all
    store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", str(seq_len))
    assert store.manifest.build["document_attention"] == "isolated"
    ids, trained, behaviour, starts = [], [], [], []
    for row in rows:
        doc_ids, doc_trained, doc_behaviour = _laid_out(row)
        starts += [len(ids)] * len(doc_ids)
        ids, trained, behaviour = ids + doc_ids, trained + doc_trained, behaviour + doc_behaviour
    cut = 0
    for k in range(len(store)):
        first = k * seq_len
        window = slice(first, first + seq_len + 1)
        real = len(ids[window])
        sample = store[k]
        assert sample["input_ids"][:real].tolist() == ids[window]
        assert sample["loss_mask"][: real - 1].tolist() == trained[window][1:]
        expected = [np.nan if start < first else value for value, start in
                    zip(behaviour[window][1:], starts[window][1:], strict=True)]
        cut += sum(start < first and not np.isnan(value) for value, start in
                   zip(behaviour[window][1:], starts[window][1:], strict=True))
        np.testing.assert_array_equal(sample["behaviour_logprob"][: real - 1], np.array(expected, np.float32))
    assert cut > 0, "a rollout should be cut across two samples"
    assert (len(store) - 1) * seq_len < len(ids) - 1 <= len(store) * seq_len  # every target once


def test_rollouts_are_not_packed_across_documents(llama_dir, tokenizer, tmp_path):
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    result = CliRunner().invoke(teacher_cli.main, [
        "build", "--model", str(llama_dir), "--dataset", str(dataset), "--output", str(tmp_path / "store"),
        "--document-attention", "cross", "--seq-len", "24", "--device", "cpu"])
    assert result.exit_code == 2 and "--document-attention cross" in result.output
    assert not (tmp_path / "store").exists()


def test_train_on_all_trains_the_prompt_too_without_behaviour(llama_dir, tokenizer, tmp_path):
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack", "--train-on", "all")
    ids, trained, _ = _laid_out(rows[1], train_all=True)
    assert store[1]["loss_mask"][: len(ids) - 1].tolist() == trained[1:]


def test_the_model_own_logprobs_are_the_behaviour_when_it_sampled_plainly(llama_dir, tokenizer, tmp_path):
    rows = _rows(tokenizer, sampling_logprobs=False)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack")
    assert store.manifest.dataset["behaviour"] == "response_logprobs"
    ids, _, behaviour = _laid_out(rows[0])
    np.testing.assert_array_equal(store[0]["behaviour_logprob"][: len(ids) - 1], np.array(behaviour[1:], np.float32))


def test_without_the_sampling_logprobs_of_a_tempered_draw_no_behaviour_is_kept(llama_dir, tokenizer, tmp_path,
                                                                               caplog):
    rows = _rows(tokenizer, sampling_logprobs=False)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                              sampling=PLAIN | {"temperature": 0.7})
    with caplog.at_level(logging.WARNING):
        store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack")
    assert "rollout" not in store.manifest.targets and "behaviour_logprob" not in store[0]
    assert store.manifest.dataset["format"] == "rollouts"  # the drawn tokens all the same
    assert store[0]["input_ids"][: len(_laid_out(rows[0])[0])].tolist() == _laid_out(rows[0])[0]
    assert "no behaviour log-probs" in caplog.text


def test_another_tokenizer_reads_the_text_again(llama_dir, tokenizer, tmp_path, caplog):
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256="0" * 64)
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    with caplog.at_level(logging.WARNING):
        store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack", "--chat-template",
                      str(template))
    assert "rollout" not in store.manifest.targets and store.manifest.dataset["format"] == "messages"
    assert "another tokenizer" in caplog.text
    # The reply was tokenized again from its text, "cat" then: not the drawn ▁c + at.
    sample = store[0]
    trained = sample["input_ids"][1:][sample["loss_mask"]].tolist()
    assert trained[-3:] == _pieces(tokenizer, "▁is", "▁small") + [EOS]
    assert trained[:-3] != _pieces(tokenizer, "▁c", "at")


def test_an_output_of_format_version_1_is_read_as_text(llama_dir, tokenizer, tmp_path, caplog):
    rows = _rows(tokenizer)
    dataset = write_generated(tmp_path / "gen", rows, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    manifest = json.loads((dataset / "generation.json").read_text())
    for shard in manifest["shards"]:  # as version 1 wrote it: without prompt_token_ids
        path = dataset / shard["path"]
        pq.write_table(pq.read_table(path).drop_columns(["prompt_token_ids"]), path)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["format_version"] = 1
    del manifest["manifest_sha256"]
    manifest["manifest_sha256"] = canonical_digest(manifest)
    (dataset / "generation.json").write_text(json.dumps(manifest))
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    with caplog.at_level(logging.WARNING):
        store = build(llama_dir, dataset, tmp_path / "store", "--seq-len", "24", "--no-pack", "--chat-template",
                      str(template))
    assert store.manifest.dataset["format"] == "messages" and "older teacher-cache" in caplog.text


def test_a_student_scored_by_itself_has_importance_weight_one_and_no_reverse_kl(llama_dir, tmp_path):
    """The whole loop on the tiny Llama as both student and teacher: it answers (generate, T = 1), scores its own
    answers (build, packed: some replies are cut across samples) and trains with rollout_rkl. Before its first
    update the student is the policy that drew every token and the teacher is the student: each importance weight
    q/mu is 1 and each advantage log q - log p is 0, up to float noise, wherever a behaviour log-prob is kept."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(12)))
    runner = CliRunner()
    generated = runner.invoke(teacher_cli.main, [
        "generate", "--model", str(llama_dir), "--prompts", str(prompts), "--output", str(tmp_path / "gen"),
        "--chat-template", str(template), "--max-new-tokens", "12", "--keep-truncated", "--keep-duplicates",
        "--keep-empty", "--device", "cpu", "--dtype", "float32"])
    assert generated.exit_code == 0, generated.output
    store = build(llama_dir, tmp_path / "gen", tmp_path / "store", "--seq-len", "40")
    assert "rollout" in store.manifest.targets
    behaviour = np.stack([store[i]["behaviour_logprob"] for i in range(len(store))])
    assert 0 < np.isnan(behaviour[np.stack([store[i]["loss_mask"] for i in range(len(store))])]).sum()  # cut
    trained = runner.invoke(student_main, [
        "--store", str(tmp_path / "store"), "--student", str(llama_dir), "--output", str(tmp_path / "run"),
        "--loss", "rollout_rkl=1", "--max-steps", "1", "--log-every", "1",
        "--batch-size", str(len(store)), "--eval-store", str(tmp_path / "store"), "--device", "cpu",
        "--allow-chat-template-mismatch"])
    assert trained.exit_code == 0, trained.output
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout_weight"] == pytest.approx(1.0, abs=1e-4)
    assert first["rollout_rkl"] == pytest.approx(0.0, abs=1e-4)
