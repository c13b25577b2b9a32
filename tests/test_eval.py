"""`student-train eval`: the metric math on hand-made cases, the scored metrics of tiny models against a brute-force
forward, and the command end to end (three report files) with its error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, write_jsonl
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import student_train.evaluate as evaluate_module
from storage.reader import Store
from storage.samples import Rows
from student_train.cli import main
from student_train.eval_metrics import (
    ECE_BINS,
    calibration_bins,
    ece,
    expected_calibration_error,
    parameter_count,
    perplexity,
    reliability_diagram,
    weight_bytes,
)
from student_train.eval_speed import measure
from student_train.evaluate import read_rows, score
from teacher_cache.teacher import TransformersTeacher

HELD_OUT = 0.2
# The scores recompute the brute force's log-probs with other kernels and batch shapes: float32 noise, measured at up
# to 7e-6 nat on the tiny models. ECE's bins and the argmax are discontinuous in them: a confidence within the noise
# of a bin edge, or two top ids within the noise of each other, may land on either side. Such positions, rare, widen
# the tolerance by what each can change (`_brute_force`); elsewhere the comparison is as tight as float arithmetic.
RECOMPUTE_NOISE = 1e-4
STUDENT = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    root = tmp_path_factory.mktemp("eval-store")
    return make_small_store(root, llama_dir, corpus_texts[:24], top_k=4, num_draws=4)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, llama_dir) -> Path:
    """A trained-looking student: weights and the teacher's tokenizer, half the teacher's width, one layer."""
    path = tmp_path_factory.mktemp("eval-student")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**STUDENT)).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def held_out(store):
    """The rows training holds out with --eval-fraction HELD_OUT: the store's last round(n * HELD_OUT)."""
    opened = Store(store)
    return read_rows(opened, len(opened) - round(len(opened) * HELD_OUT), len(opened))


def _brute_force(teacher_dir: Path, student_dir: Path, rows) -> dict:
    """Full [B, L, V] logits of plain HF forwards, every metric computed densely at the loss-mask positions."""
    ids = torch.from_numpy(rows.input_ids)
    attention = torch.from_numpy(rows.attention_mask[:, :-1]).long()
    mask = torch.from_numpy(rows.loss_mask)
    logp = {}
    with torch.no_grad():
        for name, path in (("teacher", teacher_dir), ("student", student_dir)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            logp[name] = model(input_ids=ids[:, :-1], attention_mask=attention).logits.log_softmax(-1)[mask]
    target = ids[:, 1:][mask]
    out = {"tokens": int(mask.sum())}
    edges = torch.arange(1, ECE_BINS, dtype=torch.float64) / ECE_BINS  # the inner edges of ECE's bins
    tied = {}
    for name, lp in logp.items():
        top2 = lp.topk(2, -1).values
        confidence, top = lp.max(-1)
        tied[name] = top2[:, 0] - top2[:, 1] < RECOMPUTE_NOISE  # the argmax may be either id
        on_edge = (confidence.exp().double()[:, None] - edges).abs().min(-1).values < RECOMPUTE_NOISE
        # Moving one position to the neighbouring bin, or flipping whether it is right, changes ECE by at most 2 / n.
        out[name] = {"lm_loss": -lp.gather(1, target[:, None]).mean().item(),
                     "ece": ece(confidence.exp(), top == target),
                     "ece_slack": 1e-5 + 2 * int((on_edge | tied[name]).sum()) / len(target)}
    t, s = logp["teacher"], logp["student"]
    out["kl"] = (t.exp() * (t - s)).sum(-1).mean().item()
    out["agreement"] = (t.argmax(-1) == s.argmax(-1)).double().mean().item()
    out["agreement_slack"] = 1e-9 + int((tied["teacher"] | tied["student"]).sum()) / len(target)
    return out


@pytest.fixture(scope="module")
def brute(llama_dir, student_dir, held_out) -> dict:
    return _brute_force(llama_dir, student_dir, held_out)


# --- metric math on hand-made cases -------------------------------------------------------------------------------


def test_ece_of_a_calibrated_predictor_is_zero():
    """In bin i every prediction has the bin's middle confidence (2i+1)/30, and exactly 2i+1 of 30 are right."""
    confidence, correct = [], []
    for i in range(15):
        confidence += [(2 * i + 1) / 30] * 30
        correct += [True] * (2 * i + 1) + [False] * (29 - 2 * i)
    confidence, correct = torch.tensor(confidence), torch.tensor(correct)
    assert ece(confidence, correct) == pytest.approx(0.0, abs=1e-6)
    diagram = reliability_diagram(calibration_bins(confidence, correct))
    assert [b["count"] for b in diagram] == [30] * 15
    for b in diagram:
        assert b["lower"] < b["confidence"] <= b["upper"]
        assert b["accuracy"] == pytest.approx(b["confidence"], abs=1e-6)


def test_ece_of_a_miscalibrated_predictor_is_the_hand_computed_value():
    # bin (0.8667, 0.9333]: 4 predictions at 0.9, 2 right: |0.5 - 0.9| * 4/6; bin (0.2667, 0.3333]: 2 at 0.3, both
    # right: |1 - 0.3| * 2/6. ECE = 0.2667 + 0.2333 = 0.5
    confidence = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    correct = torch.tensor([True, False, False, True, True, True])
    assert ece(confidence, correct) == pytest.approx(0.4 * 4 / 6 + 0.7 * 2 / 6)
    # an always-sure predictor right half the time is off by one half; with 2 bins the same
    assert ece(torch.ones(10), torch.arange(10) % 2 == 0) == pytest.approx(0.5)
    assert ece(torch.ones(10), torch.arange(10) % 2 == 0, bins=2) == pytest.approx(0.5)
    # edges (exact in binary): a bin holds (lower, upper]; confidence 1 falls in the last bin
    bins = calibration_bins(torch.tensor([0.25, 0.25 + 1e-3, 1.0]), torch.tensor([False, False, True]), bins=4)
    assert bins[0].tolist() == [1, 1, 0, 1]
    # sums add up over chunks
    halves = calibration_bins(confidence[:3], correct[:3]) + calibration_bins(confidence[3:], correct[3:])
    assert expected_calibration_error(halves) == pytest.approx(ece(confidence, correct))


def test_perplexity_is_exp_of_the_loss():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1000.0) == math.inf


def test_parameter_count_and_weight_bytes(tmp_path, student_dir):
    tied = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False),
                                "extra": torch.nn.Linear(4, 3)})
    tied["head"].weight = tied["embed"].weight
    assert parameter_count(tied) == 10 * 4 + 4 * 3 + 3  # the shared weight once

    for name, size in (("model-00001-of-00002.safetensors", 1000), ("model-00002-of-00002.safetensors", 24),
                       ("pytorch_model.bin", 100), ("config.json", 500), ("tokenizer.json", 300)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert weight_bytes(tmp_path) == 1124

    h, layer = 32, 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k, v, o + gate, up, down + two norms
    expected = 2 * 32000 * h + layer + h  # embeddings, untied head, one layer, final norm
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert parameter_count(model) == expected
    stored = weight_bytes(student_dir)
    assert 4 * expected < stored < 4 * expected + 65536  # fp32 tensors plus the safetensors header


# --- scoring tiny models ------------------------------------------------------------------------------------------


def test_scored_metrics_equal_a_brute_force_forward(llama_dir, student_dir, held_out, brute):
    teacher, student = (TransformersTeacher(str(p), device="cpu", dtype="float32") for p in (llama_dir, student_dir))
    result = score(teacher, student, held_out, batch_size=3, chunk_positions=7).result()
    assert result["student"]["tokens"] == brute["tokens"] == int(held_out.loss_mask.sum())
    for name in ("teacher", "student"):
        assert result[name]["lm_loss"] == pytest.approx(brute[name]["lm_loss"], rel=1e-5)
        assert result[name]["perplexity"] == pytest.approx(math.exp(brute[name]["lm_loss"]), rel=1e-4)
        assert result[name]["ece"] == pytest.approx(brute[name]["ece"], abs=brute[name]["ece_slack"])
    assert result["student"]["kl_to_teacher"] == pytest.approx(brute["kl"], rel=1e-4)
    assert result["student"]["top1_agreement"] == pytest.approx(brute["agreement"], abs=brute["agreement_slack"])
    assert brute["kl"] > 1.0  # the models differ: the comparison means something

    itself = score(teacher, teacher, held_out, batch_size=4, chunk_positions=64).result()
    assert itself["student"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert itself["student"]["top1_agreement"] == 1.0
    assert itself["student"]["lm_loss"] == pytest.approx(itself["teacher"]["lm_loss"])


def test_speed_and_memory_measurement(llama_dir, held_out):
    speed = measure(str(llama_dir), device="cpu", dtype="float32", input_ids=held_out.input_ids,
                    attention_mask=held_out.attention_mask, batch_size=4, chunk_positions=64)
    assert speed["forward_tokens"] == int(held_out.attention_mask[:, :-1].sum())
    assert speed["forward_batches"] == math.ceil(len(held_out) / 4)
    assert speed["tokens_per_s"] == pytest.approx(speed["forward_tokens"] / speed["forward_seconds"])
    assert speed["ms_per_token"] == pytest.approx(1000 / speed["tokens_per_s"])
    assert speed["peak_memory_bytes"] > 0


# --- the command --------------------------------------------------------------------------------------------------


def test_cli_writes_json_markdown_and_png(llama_dir, student_dir, store, held_out, brute):
    result = CliRunner().invoke(main, ["eval", "--teacher", str(llama_dir), "--student", str(student_dir),
                                       "--store", str(store), "--held-out-fraction", str(HELD_OUT),
                                       "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = student_dir / "eval"  # the default: beside the student
    report = json.loads((output / "report.json").read_text())
    total = len(Store(store))
    assert report["evaluated_on"]["first_sample"] == total - round(total * HELD_OUT)
    assert report["evaluated_on"]["samples"] == len(held_out)
    assert report["evaluated_on"]["tokens"] == brute["tokens"]
    teacher, student = report["teacher"], report["student"]
    for name in ("teacher", "student"):
        assert report[name]["lm_loss"] == pytest.approx(brute[name]["lm_loss"], rel=1e-5)
        assert report[name]["ece"] == pytest.approx(brute[name]["ece"], abs=brute[name]["ece_slack"])
        assert len(report[name]["reliability"]) == 15
        assert report[name]["tokens_per_s"] > 0
        # a fresh process that loaded the weights and ran them holds at least most of their bytes
        assert report[name]["peak_memory_bytes"] > 0.9 * report[name]["disk_bytes"]
    assert (teacher["kl_to_teacher"], teacher["top1_agreement"]) == (0.0, 1.0)
    assert student["kl_to_teacher"] == pytest.approx(brute["kl"], rel=1e-4)
    assert teacher["parameters"] == AutoModelForCausalLM.from_pretrained(llama_dir).num_parameters()
    assert teacher["disk_bytes"] == (llama_dir / "model.safetensors").stat().st_size
    assert report["ratios"]["parameters"] == pytest.approx(student["parameters"] / teacher["parameters"])
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["versions"]["torch"]

    table = (output / "report.md").read_text()
    assert table in result.output
    assert f"| LM loss (nats/token) | {teacher['lm_loss']:.4f} | {student['lm_loss']:.4f} |" in table
    with Image.open(output / "report.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600


def test_cli_on_text(tmp_path, monkeypatch, llama_dir, student_dir, corpus_texts):
    """--data: text tokenized with the teacher's tokenizer and packed; the measurement runs in this process here."""
    monkeypatch.setattr(evaluate_module, "measure_in_fresh_process", lambda path, **kw: measure(path, **kw))
    texts = corpus_texts[100:110]
    data = write_jsonl(tmp_path / "heldout.jsonl", texts)
    result = CliRunner().invoke(main, ["eval", "--teacher", str(llama_dir), "--student", str(student_dir),
                                       "--data", str(data), "--seq-len", "16", "--samples", "3", "--output",
                                       str(tmp_path / "report"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["evaluated_on"] == {"data": str(data), "split": "train", "format": "text", "samples": 3,
                                      "seq_len": 16, "document_attention": "cross", "tokens": 3 * 16}
    # the rows: documents + EOS as one stream, row i = stream[16 i : 16 i + 17]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    stream = np.concatenate([ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]])
    ids = np.stack([stream[16 * i:16 * i + 17] for i in range(3)])
    real = np.ones_like(ids, dtype=bool)
    expected = _brute_force(llama_dir, student_dir, Rows(ids, real, real[:, 1:], np.zeros_like(ids)))
    assert report["student"]["lm_loss"] == pytest.approx(expected["student"]["lm_loss"], rel=1e-5)
    assert report["student"]["kl_to_teacher"] == pytest.approx(expected["kl"], rel=1e-4)
    assert (tmp_path / "report" / "report.png").stat().st_size > 0


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory, student_dir) -> Path:
    path = tmp_path_factory.mktemp("eval-other-tokenizer")
    shutil.copytree(student_dir, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval"))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def config_only_student(tmp_path_factory, llama_dir) -> Path:
    path = tmp_path_factory.mktemp("eval-config-only")
    LlamaConfig(**STUDENT).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("no source", "exactly one of --store"),
    ("missing teacher", "--teacher /nonexistent/teacher: no such directory"),
    ("no weights", "no weights"),
    ("other tokenizer", "tokenizer mismatch"),
    ("teacher with another tokenizer", "Pass the teacher that built the store"),
    ("other tokenizer on text", "Use a student with the teacher's tokenizer"),
    ("no held-out samples", "pass a larger --held-out-fraction, --all"),
    ("missing store", "has no manifest.json"),
    ("seq-len with a store", "--seq-len: only with --data"),
])
def test_cli_errors_name_the_fix(tmp_path, llama_dir, student_dir, store, other_tokenizer_student,
                                 config_only_student, case, expected):
    options = {"--teacher": str(llama_dir), "--student": str(student_dir), "--store": str(store)}
    text = write_jsonl(tmp_path / "text.jsonl", ["To be, or not to be, that is the question."])
    options.update({
        "no source": {"--store": None},
        "missing teacher": {"--teacher": "/nonexistent/teacher"},
        "no weights": {"--student": str(config_only_student)},
        "other tokenizer": {"--student": str(other_tokenizer_student)},
        "teacher with another tokenizer": {"--teacher": str(other_tokenizer_student)},
        "other tokenizer on text": {"--student": str(other_tokenizer_student), "--store": None, "--data": str(text)},
        "no held-out samples": {"--held-out-fraction": "0.001"},
        "missing store": {"--store": str(tmp_path / "nowhere")},
        "seq-len with a store": {"--seq-len": "16"},
    }[case])
    args = ["eval", *[x for option, value in options.items() if value is not None for x in (option, value)]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert expected in result.output, result.output
