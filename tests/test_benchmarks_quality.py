"""`benchmarks/quality.py` on a tiny teacher and student, a few steps per row: the report's rows exist with finite
numbers, and the figures it rests on match independent brute-force computations.

- The online row's first training step: its KD loss is KL(teacher || student) of the two models' own full forwards
  (`model(...).logits`) over the first batch, with the student at its seeded init.
- The CE row's held-out LM loss: a plain forward of the saved student over every held-out sample.
- A second run with the same options reuses every store, run and evaluation.

Legend: B batch, L positions, V vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_benchmark, make_student_config, write_jsonl
from torch.special import xlogy
from transformers import AutoConfig, AutoModelForCausalLM

from storage.reader import Store
from student_train.loader import LoaderConfig, StoreLoader

STEPS, BATCH, SEQ_LEN, SEED, ALPHA = 2, 2, 32, 4, 0.8


quality = load_benchmark("quality")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, corpus_texts) -> dict:
    root = tmp_path_factory.mktemp("quality")
    student = make_student_config(root / "student", llama_dir)
    return {"root": root, "student": student, "args": [
        "--teacher", str(llama_dir), "--student-config", str(student),
        "--train-data", str(write_jsonl(root / "train.jsonl", corpus_texts[:30])),
        "--heldout-data", str(write_jsonl(root / "heldout.jsonl", corpus_texts[100:110])),
        "--output", str(root / "out"), "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
        "--alpha", str(ALPHA), "--seed", str(SEED), "--lr", "1e-2", "--heldout-samples", "4", "--eval-every", "1",
        "--save-every", str(STEPS), "--chunk-positions", "64", "--device", "cpu"]}


@pytest.fixture(scope="module")
def report(setup) -> dict:
    result = CliRunner().invoke(quality.main, setup["args"])
    assert result.exit_code == 0, result.output
    assert "| online full KD |" in result.output
    return json.loads((setup["root"] / "out" / "quality.json").read_text())


def test_every_row_is_reported_with_finite_numbers(setup, report):
    out = setup["root"] / "out"
    assert [row["name"] for row in report["rows"]] == [row.name for row in quality.ROWS]
    for row in report["rows"]:
        for key in ("lm_loss", "ece", "kl_to_teacher", "top1_agreement", "wall_s", "train_tokens_per_s"):
            assert math.isfinite(row[key]), (row["name"], key)
        assert row["tokens"] == report["teacher"]["tokens"] > 0
        assert [step for step, _ in row["curves"]["heldout"]] == list(range(1, STEPS + 1))
        assert (out / "runs" / row["name"] / "model.safetensors").exists()
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["topk_renorm_k8"]["options"]["top_k"] == 8
    assert by_name["online"]["options"]["online_teacher"] == report["setup"]["teacher"]
    assert report["setup"]["tokens_per_run"] == STEPS * BATCH * SEQ_LEN
    assert report["machine"]["cpu_cores"] and (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| top-64 + tail |" in (out / "quality.md").read_text()
    assert (out / "quality_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_hybrid_rows_train_on_their_own_stores(setup, report):
    out = setup["root"] / "out"
    for row in (r for r in quality.ROWS if r.name.startswith("hybrid")):
        spec = quality.STORES[row.store]
        targets = Store(out / "stores" / row.store).manifest.targets
        assert targets["sampled"]["draws_from"] == "tail"
        assert (targets["topk"]["k"], targets["sampled"]["num_draws"]) == (spec.top_k, spec.num_draws)
        ran = next(r for r in report["rows"] if r["name"] == row.name)
        assert ran["options"]["targets_from"] == "hybrid" and ran["options"]["store"].endswith(row.store)


def test_systematic_rows_train_on_stores_of_systematic_draws(setup, report):
    """Each row of draws reads a store of its scheme: `*_systematic` rows systematic draws, the others multinomial
    ones (no `draw_scheme` in the manifest, as every store built before the option)."""
    out = setup["root"] / "out"
    drawn = [row for row in quality.ROWS if row.options.get("targets_from") in ("sampled", "hybrid")]
    assert sum(row.name.endswith("_systematic") for row in drawn) == 3
    for row in drawn:
        sampled = Store(out / "stores" / row.store).manifest.targets["sampled"]
        assert sampled.get("draw_scheme") == ("systematic" if row.name.endswith("_systematic") else None), row.name
        ran = next(r for r in report["rows"] if r["name"] == row.name)
        assert ran["options"]["store"].endswith(row.store) and math.isfinite(ran["lm_loss"])


def test_target_bytes_are_the_files_on_disk(setup, report):
    """A row that reads a whole record is charged the record's files; fewer kept ids cost fewer bytes."""
    out = setup["root"] / "out"
    by_name = {row["name"]: row for row in report["rows"]}

    def on_disk(store: str, names: tuple[str, ...]) -> float:
        size = sum(path.stat().st_size for path in (out / "stores" / store / "shards").glob("shard-*/*/**/*")
                   if path.is_file() and path.relative_to(out / "stores" / store / "shards").parts[1] in names)
        return size / Store(out / "stores" / store).manifest.num_tokens

    topk = ("topk_ids", "topk_logprob_floor", "topk_logprob_excess", "tail_logmass")
    sampled = ("sampled_nunique", "sampled_offsets", "sampled_ids", "sampled_counts")
    assert by_name["topk_tail_k64"]["target_bytes_per_token"] == pytest.approx(on_disk("main", topk))
    assert by_name["sampled_n50"]["target_bytes_per_token"] == pytest.approx(on_disk("main", sampled))
    assert by_name["hybrid_k8_n16"]["target_bytes_per_token"] == pytest.approx(
        on_disk("hybrid_k8_n16", topk + sampled))
    k8, k64 = (by_name[f"topk_renorm_k{k}"]["target_bytes_per_token"] for k in (8, 64))
    assert 0 < k8 < k64
    assert by_name["ce"]["target_bytes_per_token"] is None and by_name["online"]["target_bytes_per_token"] is None


def test_online_first_step_is_the_dense_kl(setup, report, llama_dir):
    out = setup["root"] / "out"
    first = json.loads((out / "runs" / "online" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    loader = StoreLoader(LoaderConfig(store=str(out / "stores" / "main"), batch_size=BATCH, seed=SEED))
    batch = next(iter(loader))
    torch.manual_seed(SEED)  # the student's random init, as training makes it
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup["student"]), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    inputs = {"input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1].long()}
    mask = batch["loss_mask"]
    with torch.no_grad():
        p = teacher(**inputs).logits.double().softmax(-1)[mask]
        logits = student(**inputs).logits.double()[mask]
    kl = (xlogy(p, p) - p * logits.log_softmax(-1)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    assert first["forward_kl"] == pytest.approx(float(kl), rel=1e-4)
    assert first["loss"] == pytest.approx(float(ALPHA * kl + (1 - ALPHA) * ce), rel=1e-4)


def test_ce_heldout_loss_is_the_saved_students_mean_nll(setup, report):
    out = setup["root"] / "out"
    heldout = Store(out / "stores" / "heldout")
    total, count = 0.0, 0
    for name, path in (("ce", out / "runs" / "ce"), ("teacher", Path(report["setup"]["teacher"]))):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        total, count = 0.0, 0
        for i in range(len(heldout)):
            sample = heldout[i]
            ids = torch.from_numpy(sample["input_ids"].astype("int64"))
            with torch.no_grad():
                logp = model(ids[None, :-1]).logits[0].double().log_softmax(-1)
            mask = torch.from_numpy(sample["loss_mask"])
            total -= float(logp.gather(1, ids[1:, None])[:, 0][mask].sum())
            count += int(mask.sum())
        expected = next(r for r in report["rows"] if r["name"] == "ce") if name == "ce" else report["teacher"]
        assert expected["lm_loss"] == pytest.approx(total / count, rel=1e-4), name
        assert expected["tokens"] == count


def test_second_run_reuses_everything_and_refuses_other_options(setup, report):
    out = setup["root"] / "out"
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.json*")}
    result = CliRunner().invoke(quality.main, [*setup["args"], "--rows", "sampled_n50"])
    assert result.exit_code == 0, result.output
    assert result.output.count("reused the finished run") == 3  # ce, sampled, online
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.json*")} == mtimes
    again = json.loads((out / "quality.json").read_text())
    assert [row["name"] for row in again["rows"]] == ["ce", "sampled_n50", "online"]
    for row in again["rows"]:
        old = next(r for r in report["rows"] if r["name"] == row["name"])
        assert (row["lm_loss"], row["wall_s"]) == (old["lm_loss"], old["wall_s"])

    result = CliRunner().invoke(quality.main, [*setup["args"], "--lr", "2e-2"])
    assert result.exit_code == 2 and "other options (lr)" in result.output, result.output
    result = CliRunner().invoke(quality.main, [*setup["args"], "--rows", "topk9"])
    assert result.exit_code == 2 and "unknown row(s) topk9" in result.output
