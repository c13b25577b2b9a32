"""Conversations end to end: a `messages` dataset goes through `teacher-cache build` (chat template, assistant-only
loss mask, isolated documents) -> `info` / `inspect` -> `student-train`, which checks the student's chat template."""

import hashlib
import json

import numpy as np
import pytest
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


def test_columns_are_named_by_options(tmp_path, llama_dir):
    """--messages-field and --prompt-field / --completion-field: the same store as from the default column names."""
    assert _build(tmp_path, llama_dir).exit_code == 0
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"id": i, "conversation": m}) + "\n" for i, m in enumerate(CONVERSATIONS)))
    refused = _build(tmp_path, llama_dir, "--dataset", str(renamed), "--output", str(tmp_path / "refused"))
    assert refused.exit_code == 2 and "--text-field" in refused.output and "--messages-field" in refused.output
    result = _build(tmp_path, llama_dir, "--dataset", str(renamed), "--messages-field", "conversation",
                    "--output", str(tmp_path / "renamed"))
    assert result.exit_code == 0, result.output
    default, named = Store(tmp_path / "store"), Store(tmp_path / "renamed")
    assert named.manifest.dataset["columns"] == ["conversation"] and default.manifest.dataset["columns"] == ["messages"]
    assert len(named) == len(default) > 0
    for i in range(len(default)):
        for key in ("input_ids", "loss_mask", "segment_ids", "topk_ids"):
            assert np.array_equal(named[i][key], default[i][key]), (i, key)

    pairs = [(m[-2]["content"], m[-1]["content"]) for m in CONVERSATIONS if m[-1]["role"] == "assistant"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    result = _build(tmp_path, llama_dir, "--dataset", str(qa), "--prompt-field", "question", "--completion-field",
                    "answer", "--output", str(tmp_path / "qa"))
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "qa")
    assert store.manifest.dataset["format"] == "prompt-completion"
    assert store.manifest.dataset["columns"] == ["question", "answer"]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    trained = " ".join(tokenizer.decode(store[i]["input_ids"][1:][store[i]["loss_mask"]].astype(np.int64))
                       for i in range(len(store)))
    assert all(a in trained for _, a in pairs) and not any(q in trained for q, _ in pairs)


def test_eval_scores_the_replies_of_conversations(tmp_path, monkeypatch, llama_dir):
    """`student-train eval --data` on conversations: the replies only, each conversation attending only to itself
    (isolated, the default for conversations) though all share one packed row."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import student_train.evaluate as evaluate_module
    from storage.conversations import ChatConfig, ChatEncoder
    from student_train.eval_speed import measure

    monkeypatch.setattr(evaluate_module, "measure_in_fresh_process", lambda path, **kw: measure(path, **kw))
    data, template = _write(tmp_path)
    student = tmp_path / "student"
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(student)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(student)
    result = CliRunner().invoke(student_main, [
        "eval", "--teacher", str(llama_dir), "--student", str(student), "--data", str(data), "--chat-template",
        str(template), "--seq-len", "500", "--output", str(tmp_path / "report"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["evaluated_on"]["format"] == "messages" and report["evaluated_on"]["train_on"] == "assistant"
    assert report["evaluated_on"]["document_attention"] == "isolated" and report["evaluated_on"]["samples"] == 1

    # Brute force: each conversation alone, unpadded, scored at the tokens that follow a trained flag.
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    chat = ChatEncoder(tokenizer, ChatConfig(chat_template=LLAMA2), "messages")
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("teacher", llama_dir), ("student", student))}
    loss, kl, tokens = {"teacher": 0.0, "student": 0.0}, 0.0, 0
    for index, messages in enumerate(CONVERSATIONS):
        if messages[-1]["role"] != "assistant":
            continue
        ids, trained = chat.encode(messages, [i for i, m in enumerate(messages) if m["role"] == "assistant"], index)
        ids, trained = torch.tensor(ids), torch.tensor(trained)
        with torch.no_grad():
            logp = {name: model(ids[None, :-1]).logits[0].log_softmax(-1)[trained[1:]]
                    for name, model in models.items()}
        target = ids[1:][trained[1:]]
        for name, lp in logp.items():
            loss[name] -= lp.gather(1, target[:, None]).sum().item()
        kl += (logp["teacher"].exp() * (logp["teacher"] - logp["student"])).sum().item()
        tokens += len(target)
    assert report["evaluated_on"]["tokens"] == tokens
    for name in ("teacher", "student"):
        assert report[name]["lm_loss"] == pytest.approx(loss[name] / tokens, rel=1e-5)
    assert report["student"]["kl_to_teacher"] == pytest.approx(kl / tokens, rel=1e-4)
