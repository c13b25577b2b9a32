"""Conversations end to end: a `messages` dataset goes through `teacher-cache build` (chat template, assistant-only
loss mask, isolated documents) -> `info` / `inspect` -> `student-train`, which checks the student's chat template."""

import hashlib
import json

import numpy as np
from click.testing import CliRunner
from conftest import make_student_config
from transformers import AutoTokenizer

from storage.reader import Store
from student_train.cli import main as student_main
from teacher_cache.cli import main as teacher_main

LLAMA2 = (  # a Llama-2 chat template: replies end with EOS
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>> ' + message['content'] + ' <</SYS>> ' }}{% endif %}"
    "{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome, on the Tiber."}],
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven is prime."}],
    [{"role": "user", "content": "Nothing answers this question."}],  # no assistant turn: skipped
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
] * 3


def _write(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    template = tmp_path / "llama2.jinja"
    template.write_text(LLAMA2)
    return data, template


def _build(tmp_path, llama_dir, *extra):
    data, template = _write(tmp_path)
    args = ["build", "--model", str(llama_dir), "--dataset", str(data), "--output", str(tmp_path / "store"),
            "--chat-template", str(template), "--seq-len", "64", "--targets", "topk", "--top-k", "8",
            "--device", "cpu", "--dtype", "float32", "--batch-size", "4", *extra]
    return CliRunner().invoke(teacher_main, args)


def test_build_trains_only_the_assistant_replies(tmp_path, llama_dir, caplog):
    result = _build(tmp_path, llama_dir)
    assert result.exit_code == 0, result.output
    assert "skipped 3 conversations with nothing to train on" in caplog.text and "truncated" not in caplog.text
    store = Store(tmp_path / "store")
    dataset, build = store.manifest.dataset, store.manifest.build
    assert dataset["format"] == "messages" and dataset["train_on"] == "assistant"
    assert dataset["chat_template_sha256"] == hashlib.sha256(LLAMA2.encode()).hexdigest()
    assert build["document_attention"] == "isolated"  # the default for conversations
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    trained = []
    for i in range(len(store)):
        sample = store[i]
        targets = sample["input_ids"][1:][sample["loss_mask"]]
        trained.append(tokenizer.decode(targets.astype(np.int64)))
    text = " ".join(trained)
    replies = [m["content"] for chat in CONVERSATIONS for m in chat if m["role"] == "assistant"]
    for reply in replies:
        assert reply in text
    for chat in CONVERSATIONS:
        for message in chat:
            if message["role"] != "assistant":
                assert message["content"] not in text
    assert text.count("</s>") == len(replies)  # each reply's end of turn is trained, nothing else's

    info = CliRunner().invoke(teacher_main, ["info", str(tmp_path / "store")])
    assert info.exit_code == 0 and "documents isolated; messages, trained on assistant" in info.output, info.output
    share = store.manifest.num_tokens / store.manifest.num_positions
    assert f"({share:.1%})" in info.output
    inspect = CliRunner().invoke(teacher_main, ["inspect", str(tmp_path / "store"), "--json"])
    assert inspect.exit_code == 0, inspect.output


def test_student_train_checks_the_chat_template(tmp_path, llama_dir):
    assert _build(tmp_path, llama_dir, "--no-pack").exit_code == 0
    student = make_student_config(tmp_path / "student", llama_dir)  # its tokenizer has no chat template
    args = ["--store", str(tmp_path / "store"), "--student", str(student), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.25", "--device", "cpu"]
    refused = CliRunner().invoke(student_main, args)
    assert refused.exit_code == 2 and "chat template mismatch" in refused.output, refused.output
    assert "--allow-chat-template-mismatch" in refused.output
    check = CliRunner().invoke(student_main, ["check", "--store", str(tmp_path / "store"), "--student", str(student)])
    assert check.exit_code == 1 and "chat template mismatch" in check.output, check.output

    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = LLAMA2
    tokenizer.save_pretrained(student)
    result = CliRunner().invoke(student_main, args)
    assert result.exit_code == 0, result.output
