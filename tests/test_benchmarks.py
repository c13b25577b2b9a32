"""Smoke runs of the benchmark scripts at tiny sizes, through their click commands.

Each run's JSON is checked for its rows and for positive, finite figures, and against something computed here
independently: the loader's tokens against the store's loss masks, the losses at step 0 against dense computations
over the whole vocabulary with the same student and teacher.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import load_benchmark, write_jsonl
from transformers import AutoModelForCausalLM

from storage import open_store
from student_train.student import load_student, load_tokenizer

pytestmark = pytest.mark.slow  # real training steps; train_step.py starts three processes


def _invoke(name: str, args: list[str]) -> dict:
    result = CliRunner().invoke(load_benchmark(name).main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_loader_speed_counts_the_store_tokens(tmp_path, llama_dir, corpus_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:48])
    store, out = tmp_path / "store", tmp_path / "loader.json"
    _invoke("loader_speed", [str(store), "--build-from", str(llama_dir), "--dataset", str(data), "--seq-len", "32",
                             "--samples", "40", "--batch-size", "1", "--workers", "0,2", "--steps", "2", "--repeats",
                             "1", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())

    # Batches of one drop nothing: an epoch is every sample below student-train's held-out tail (5%).
    opened = open_store(store)
    assert len(opened) == 40
    train = len(opened) - round(0.05 * len(opened))
    tokens = int(opened.read_rows(0, train, ["loss_mask"])["loss_mask"].sum())
    assert [(row["workers"], row["verify"]) for row in result["loader"]] == [(0, True), (0, False), (2, True),
                                                                             (2, False)]
    for row in result["loader"]:
        assert (row["samples"], row["batches"], row["tokens"]) == (train, train, tokens)
        assert _positive(row["tokens_per_s"], row["steady_tokens_per_s"], row["first_batch_s"])
    assert _positive(result["consumption"]["tokens_per_s"], *result["consumption"]["step_s"])
    assert [row["workers"] for row in result["fed_by_loader"]] == [0, 2]
    for row in result["fed_by_loader"]:
        assert _positive(row["tokens_per_s"], row["seconds"]) and 0 <= row["wait_share"] < 1


def _dense_losses(student, teacher, batch: dict) -> dict[str, float]:
    """CE and the online loss (forward KL over the whole vocabulary, 0.9, + CE, 0.1): means over trained positions."""
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    mask = torch.from_numpy(batch["loss_mask"])
    with torch.no_grad():
        logq = F.log_softmax(student(input_ids=ids[:, :-1]).logits, -1)[mask]
        logp = F.log_softmax(teacher(input_ids=ids[:, :-1]).logits, -1)[mask]
    ce = -logq.gather(-1, ids[:, 1:][mask][:, None]).mean()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return {"ce": float(ce), "online": float(0.9 * kl + 0.1 * ce)}


def test_train_step_losses_match_dense_computations(tmp_path, llama_dir, corpus_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:24])
    out, work = tmp_path / "step.json", tmp_path / "work"
    _invoke("train_step", ["--teacher", str(llama_dir), "--hidden", "64", "--layers", "1", "--seq", "32", "--batch",
                           "2", "--steps", "1", "--chunk", "16", "--device", "cpu", "--dataset", str(data),
                           "--only", "hybrid,online", "--workdir", str(work), "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["ce", "hybrid", "online"]
    hybrid = open_store(work / "store-hybrid")
    assert hybrid.manifest.targets["sampled"]["draws_from"] == "tail" and hybrid.manifest.targets["topk"]["k"] == 64
    assert np.array_equal(hybrid.read_rows(0, 2)["input_ids"], open_store(work / "store").read_rows(0, 2)["input_ids"])
    for row in rows.values():
        assert _positive(row["ms_per_step"], row["peak_mib"], row["held_mib"], row["ms_per_step_vs_ce"],
                         row["online_time_vs_this"]) and row["step_mib"] >= 0
    assert rows["ce"]["ms_per_step_vs_ce"] == 1.0
    assert rows["online"]["teacher_parameters"] > 0 and rows["online"]["held_mib"] > rows["ce"]["held_mib"]

    # Step 0 sees the first batch (store order) and the initial student, rebuilt here as student-train builds it.
    store = open_store(work / "store")
    batch = store.read_rows(0, 2)
    student = load_student(str(work / "student"), store.manifest, load_tokenizer(work / "student", store.manifest),
                           seed=0)
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    dense = _dense_losses(student, teacher, batch)
    for name, value in dense.items():
        assert rows[name]["first_loss"] == pytest.approx(value, rel=1e-4), name


def test_train_step_at_a_temperature_matches_the_dense_top_k_loss(tmp_path, llama_dir, corpus_texts):
    """--temperature 2 trains top-64 + tail at T = 2: the loss at step 0 is 0.9 T^2 KL(p_T || q_T) + 0.1 CE over the
    K stored ids and the tail bucket, computed here from the store's records and the student's dense logits."""
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:24])
    out, work, T = tmp_path / "step.json", tmp_path / "work", 2.0
    _invoke("train_step", ["--teacher", str(llama_dir), "--hidden", "64", "--layers", "1", "--seq", "32", "--batch",
                           "2", "--steps", "1", "--chunk", "16", "--device", "cpu", "--dataset", str(data),
                           "--only", "topk_tail", "--temperature", str(T), "--workdir", str(work), "--json", str(out)])
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    store = open_store(work / "store")
    batch = store.read_rows(0, 2)
    student = load_student(str(work / "student"), store.manifest, load_tokenizer(work / "student", store.manifest),
                           seed=0)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    mask = torch.from_numpy(batch["loss_mask"])
    with torch.no_grad():
        z = student(input_ids=ids[:, :-1]).logits.double()[mask]
    ce = (z.logsumexp(-1) - z.gather(-1, ids[:, 1:][mask][:, None])[:, 0]).mean()
    top_ids = torch.from_numpy(batch["topk_ids"].astype(np.int64))[mask]
    teacher = torch.cat([torch.from_numpy(batch["topk_logprobs"].astype(np.float64))[mask],
                         torch.from_numpy(batch["tail_logmass"].astype(np.float64))[mask][:, None]], -1)
    logp = F.log_softmax(teacher / T, -1)
    y = z / T
    outside = y.scatter(-1, top_ids, -math.inf).logsumexp(-1, keepdim=True)
    logq = torch.cat([y.gather(-1, top_ids), outside], -1) - y.logsumexp(-1, keepdim=True)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    assert rows["topk_tail"]["first_loss"] == pytest.approx(float(0.9 * T**2 * kl + 0.1 * ce), rel=1e-4)


def test_train_step_refuses_a_temperature_for_draws(tmp_path):
    result = CliRunner().invoke(load_benchmark("train_step").main, ["--temperature", "2", "--only", "sampled",
                                                                     "--workdir", str(tmp_path)])
    assert result.exit_code != 0 and "T = 1" in result.output and "--temperature" in result.output
