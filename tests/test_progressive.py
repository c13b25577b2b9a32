"""Progressive distillation: a trained student is the next teacher (`teacher-cache build --model STUDENT_DIR`).

End to end on tiny models through the CLIs users run: teacher -> store -> student A -> store of A -> student B.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from conftest import make_llama, make_student_config, write_jsonl
from transformers import AutoModelForCausalLM

from storage.reader import open_store
from student_train.cli import main as train_main
from teacher_cache.cli import main as cache_main


def _build(model, data, output):
    result = CliRunner().invoke(cache_main, ["build", "--model", str(model), "--dataset", str(data), "--output",
                                             str(output), "--seq-len", "32", "--batch-size", "4",
                                             "--samples-per-shard", "8", "--top-k", "8", "--samples", "16",
                                             "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return open_store(output)


def _train(store, student, output, steps):
    result = CliRunner().invoke(train_main, ["--store", str(store), "--student", str(student), "--output",
                                             str(output), "--max-steps", str(steps), "--batch-size", "4",
                                             "--eval-every", str(steps), "--lr", "3e-3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads((output / "final_metrics.json").read_text())


def test_a_trained_student_is_the_next_teacher(tmp_path, corpus_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:60])
    teacher = make_llama(tmp_path / "teacher")
    first = _build(teacher, data, tmp_path / "store-0")

    student_a = tmp_path / "student-a"
    _train(tmp_path / "store-0", make_student_config(tmp_path / "config-a", teacher, layers=2), student_a, 6)

    # The student's output directory is a teacher: its own weights, its tokenizer, run files beside them.
    second = _build(student_a, data, tmp_path / "store-1")
    assert second.manifest.teacher["model"] == str(student_a)
    assert second.manifest.teacher["weights_sha256"] != first.manifest.teacher["weights_sha256"]
    assert second.manifest.teacher["tokenizer_sha256"] == first.manifest.teacher["tokenizer_sha256"]
    assert len(second) == len(first)

    # Its targets are student A's own distribution: top-k against a brute-force forward of the saved model.
    model = AutoModelForCausalLM.from_pretrained(student_a, dtype=torch.float32).eval()
    for i in (0, len(second) // 2, len(second) - 1):
        sample = second[i]
        ids = torch.as_tensor(sample["input_ids"][None, :-1].astype(np.int64))
        mask = torch.as_tensor(sample["attention_mask"][None, :-1])
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=mask).logits[0].log_softmax(-1)
        trained = torch.as_tensor(sample["loss_mask"])
        full = logprobs[trained]  # [P, V]
        ids_PK = torch.as_tensor(sample["topk_ids"][sample["loss_mask"]].astype(np.int64))
        stored_PK = torch.as_tensor(sample["topk_logprobs"][sample["loss_mask"]].astype(np.float32))
        # Each stored id's log-prob is the model's own within the store's 1/128 nat, and the ids are its top 8:
        # none is less likely than the model's 8th most likely id. The forward here recomputes the build's log-probs
        # with other kernels: 1e-4 allows for that float32 noise (measured up to 7e-6 nat on the tiny teachers).
        torch.testing.assert_close(stored_PK, full.gather(1, ids_PK), rtol=0, atol=1 / 128 + 1e-4)
        eighth = full.topk(8, dim=-1).values[:, -1:]
        assert (full.gather(1, ids_PK) >= eighth - 1e-4).all()  # up to ties between the 8th and 9th
        true_next = torch.as_tensor(sample["input_ids"][1:].astype(np.int64))[trained]
        np.testing.assert_allclose(sample["true_logprob"][sample["loss_mask"]],
                                   full.gather(-1, true_next[:, None])[:, 0].numpy(), atol=1e-4)

    # A smaller student B distils from student A's store, and comes closer to A the longer it trains.
    config_b = make_student_config(tmp_path / "config-b", teacher, layers=1)
    short = _train(tmp_path / "store-1", config_b, tmp_path / "student-b1", 1)
    trained = _train(tmp_path / "store-1", config_b, tmp_path / "student-b", 12)
    assert trained["kl"] < short["kl"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student-b").config.num_hidden_layers == 1
