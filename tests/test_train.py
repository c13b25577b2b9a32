"""The training loop end to end on a tiny store: the KD loss falls, resume is exact, the student is a standard HF
model, and bad input (another tokenizer, a missing store, an occupied output) is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_llama, make_small_store, make_student_config, train_killed
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_train.cli import main
from student_train.config import TrainConfig
from student_train.train import Trainer, train


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    root = tmp_path_factory.mktemp("train-store")
    return make_small_store(root, llama_dir, corpus_texts[:40])


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, llama_dir) -> Path:
    """A config-only student (random init) with the teacher's tokenizer."""
    path = tmp_path_factory.mktemp("student-config")
    make_student_config(path, llama_dir)
    return path


def _config(store: Path, student: Path, output: Path, **overrides) -> TrainConfig:
    options = dict(store=str(store), student=str(student), output=str(output), batch_size=4, max_steps=8, lr=1e-2,
                   eval_fraction=0.2, eval_every=4, save_every=4, log_every=1, device="cpu", seed=3)
    return TrainConfig(**{**options, **overrides})


def _train_records(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval" not in r]


@pytest.mark.parametrize("loss", ["topk_tail", "topk_renorm", "sampled"])
def test_kd_loss_falls(tmp_path, store, student_config, loss):
    train(_config(store, student_config, tmp_path / "run", loss=loss, alpha=1.0, max_steps=24))
    kd = [r["kd"] for r in _train_records(tmp_path / "run")]
    assert len(kd) == 24
    assert sum(kd[-3:]) / 3 < 0.9 * sum(kd[:3]) / 3, kd


def test_resume_continues_exactly(tmp_path, store, student_config, monkeypatch):
    """Stop after the step-4 checkpoint; the resumed run's steps 5-8 equal an uninterrupted run's."""
    train(_config(store, student_config, tmp_path / "full"))
    full = _train_records(tmp_path / "full")

    train_killed(monkeypatch, _config(store, student_config, tmp_path / "cut"), completed=5)  # after the step-4 save
    train(_config(store, student_config, tmp_path / "cut", resume=True))
    resumed = _train_records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
    for a, b in zip(full, resumed, strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "kd", "ce", "tokens", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-5, atol=1e-6)


def test_saved_student_is_a_standard_model(tmp_path, store, student_config):
    evaluation = train(_config(store, student_config, tmp_path / "run", max_steps=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert len(tokenizer) == 32000 and model.config.hidden_size == 32
    ids = torch.tensor([tokenizer("To be or not to be")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 32000)
    assert set(evaluation) >= {"lm_loss", "kl", "top1_agreement"} and evaluation["tokens"] > 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["max_steps"] == 2


def test_evaluation_lm_loss_is_the_mean_true_token_nll(tmp_path, store, student_config):
    """The reported held-out LM loss equals a plain forward of the saved student over the held-out samples."""
    from storage.reader import Store

    evaluation = train(_config(store, student_config, tmp_path / "run", max_steps=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    opened = Store(store)
    held_out = range(len(opened) - round(len(opened) * 0.2), len(opened))
    total, count = 0.0, 0
    for i in held_out:
        sample = opened[i]
        ids = torch.from_numpy(sample["input_ids"].astype("int64"))
        with torch.no_grad():
            logp = model(ids[None, :-1]).logits[0].float().log_softmax(-1)
        nll = -logp.gather(1, ids[1:, None])[:, 0]
        mask = torch.from_numpy(sample["loss_mask"])
        total += float(nll[mask].sum())
        count += int(mask.sum())
    assert evaluation["tokens"] == count
    assert evaluation["lm_loss"] == pytest.approx(total / count, rel=1e-4)


def test_cli_trains_and_refuses_an_occupied_output(tmp_path, store, student_config):
    args = ["--store", str(store), "--student", str(student_config), "--output", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Student saved to" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_cli_names_both_tokenizers_on_mismatch(tmp_path, store, llama_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a tiny other tokenizer for a test"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    student = make_llama(tmp_path / "other")  # weights with a 32k vocabulary, but another tokenizer beside them
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        student)
    result = CliRunner().invoke(main, ["--store", str(store), "--student", str(student), "--output",
                                       str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"])
    assert result.exit_code == 2
    assert "tokenizer mismatch" in result.output and str(llama_dir) in result.output and str(student) in result.output
    assert not (tmp_path / "run").exists()


def test_cli_missing_store_and_missing_options(tmp_path, student_config):
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "nowhere"), "--student", str(student_config),
                                       "--output", str(tmp_path / "run")])
    assert result.exit_code == 1 and "not a teacher-cache store" in result.output
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "--student" in result.output and "--output" in result.output


def test_sampled_loss_refuses_temperature(tmp_path, store, student_config):
    with pytest.raises(ValueError, match="temperature"):
        train(_config(store, student_config, tmp_path / "run", loss="sampled", temperature=2.0))


def test_resuming_a_finished_run_keeps_its_evaluation(tmp_path, store, student_config):
    first = train(_config(store, student_config, tmp_path / "run", max_steps=2))
    again = train(_config(store, student_config, tmp_path / "run", max_steps=2, resume=True))
    assert again["step"] == 2 and again["lm_loss"] == pytest.approx(first["lm_loss"], rel=1e-6)
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["lm_loss"] == again["lm_loss"]


def test_loss_mix_and_kd_schedule_reach_the_loss(tmp_path, store, student_config):
    """The trainer passes its step to the KD schedule; the held-out KL stays forward KL over the store's default
    targets, whatever the training loss, so runs compare."""
    config = _config(store, student_config, tmp_path / "run", max_steps=4, loss=["jsd=0.5", "skew_rkl=0.3", "ce=0.2"],
                     targets_from="topk_renorm", kd_schedule="linear_warmup:4")
    trainer = Trainer(config)
    assert (trainer.eval_loss_config.weights, trainer.eval_loss_config.targets) == ({"forward_kl": 1.0}, "topk_tail")
    trainer.run()
    records = _train_records(tmp_path / "run")
    assert [r["kd_scale"] for r in records] == [0.25, 0.5, 0.75, 1.0]
    for r in records:
        expected = r["kd_scale"] * (0.5 * r["jsd"] + 0.3 * r["skew_rkl"]) + 0.2 * r["ce"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["kd"] == pytest.approx((0.5 * r["jsd"] + 0.3 * r["skew_rkl"]) / 0.8, rel=1e-5)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["loss"] == ["jsd=0.5", "skew_rkl=0.3", "ce=0.2"] and TrainConfig(**saved) == config
