"""Online full-logit KD (`--online-teacher`) against dense brute-force computations from the two models' own logits.

The reference runs each model's full forward (`model(...).logits`, not the base model + head in chunks), builds
both full softmaxes over the whole vocabulary in float64 and computes each divergence from its textbook formula with
`xlogy` (`test_losses.divergence`); losses and gradients with respect to every student parameter must match. The
CLI tests train for a few steps and check what is saved, what a resumed run does, and each refusal.

Legend: B batch, L positions, V the teacher's vocabulary, W the student's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_llama, make_small_store, make_student_config, train_killed
from safetensors import safe_open
from test_losses import BETA, SKEW, divergence
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from storage.reader import Store
from student_train.checkpoint import OPTIMIZER, RNG, read_state_file
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.loader import LoaderConfig, StoreLoader
from student_train.loss_config import LossConfig
from student_train.losses import TEACHER_HIDDEN, distillation_loss
from student_train.online_teacher import OnlineTeacher


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("online-store"), llama_dir, corpus_texts[:24])


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("online-student"), llama_dir)


@pytest.fixture(scope="module")
def teacher(store, llama_dir) -> OnlineTeacher:
    return OnlineTeacher(str(llama_dir), Store(store).manifest, device=torch.device("cpu"), bf16=False)


@pytest.fixture(scope="module")
def batch(store) -> dict[str, torch.Tensor]:
    return next(iter(StoreLoader(LoaderConfig(store=str(store), batch_size=3, shuffle=False))))


def make_student(vocab: int = 32000, seed: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False))


def inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1].long()}


def dense_loss(student, teacher_model, batch, weights: dict, temperature: float) -> tuple[torch.Tensor, dict]:
    """The loss from both models' full logits [B, L, V] and [B, L, W], in float64; the teacher's p is 0 on ids >= V."""
    mask = batch["loss_mask"]
    with torch.no_grad():
        teacher_logits = teacher_model(**inputs(batch)).logits.double()[mask]
    logits = student(**inputs(batch)).logits.double()[mask]
    p = F.pad(F.softmax(teacher_logits / temperature, -1), (0, logits.shape[-1] - teacher_logits.shape[-1]))
    q = F.softmax(logits / temperature, -1)
    means = {name: divergence(name, p, q).mean() for name in weights if name != "ce"}
    ce = F.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    kd = temperature**2 * sum(weights[name] * value for name, value in means.items())
    return kd + weights.get("ce", 0.0) * ce, means


def online_loss(student, teacher: OnlineTeacher, batch, weights: dict, temperature: float, chunk: int = 16):
    batch = batch | {TEACHER_HIDDEN: teacher.hidden(batch)}
    hidden = student.model(**inputs(batch)).last_hidden_state
    config = LossConfig(weights=weights, targets="online", temperature=temperature, jsd_beta=BETA, skew_alpha=SKEW,
                        chunk_positions=chunk)
    return distillation_loss(hidden, student.get_output_embeddings(), batch, config, teacher_head=teacher.logits)


def student_grads(loss: torch.Tensor, student) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, list(student.parameters()))


@pytest.mark.parametrize("name,temperature", [("forward_kl", 1.0), ("jsd", 2.0), ("skew_rkl", 0.7)])
def test_online_divergence_is_the_dense_one(teacher, batch, name, temperature):
    student = make_student()
    weights = {name: 0.8, "ce": 0.3}
    loss, metrics = online_loss(student, teacher, batch, weights, temperature)
    expected, means = dense_loss(student, teacher.lm.model, batch, weights, temperature)
    assert means[name] > 1e-2  # not trivially zero
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics[name].double(), means[name], rtol=1e-5, atol=1e-6)
    for got, want in zip(student_grads(loss, student), student_grads(expected, student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_student_with_padded_vocabulary_sees_teacher_zero_there(teacher, batch):
    """A student predicting more ids than the teacher: the teacher's probability is 0 on the extra ones."""
    student = make_student(vocab=32064)
    weights = {"forward_kl": 1.0, "jsd": 0.5}
    loss, _ = online_loss(student, teacher, batch, weights, 1.5)
    expected, _ = dense_loss(student, teacher.lm.model, batch, weights, 1.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(student_grads(loss, student), student_grads(expected, student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="skew_rkl"):
        teacher.check_loss(LossConfig(weights={"reverse_kl": 1.0}, targets="online"), 32064)
    teacher.check_loss(LossConfig(weights={"reverse_kl": 1.0}, targets="online"), 32000)


def test_chunk_size_changes_nothing(teacher, batch):
    student = make_student()
    weights = {"forward_kl": 0.5, "reverse_kl": 0.2, "tv": 0.2, "ce": 0.1}
    base, base_metrics = online_loss(student, teacher, batch, weights, 1.5, chunk=10_000)
    base_grads = student_grads(base, student)
    for chunk in (5, 32):
        loss, metrics = online_loss(student, teacher, batch, weights, 1.5, chunk=chunk)
        torch.testing.assert_close(loss, base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics, base_metrics, rtol=1e-6, atol=1e-6)
        for got, want in zip(student_grads(loss, student), base_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_graph_holds_no_teacher_logits(teacher, batch):
    """Neither model's [P, V] logits are saved for backward: only chunk inputs, the rest recomputed."""
    student = make_student()
    batch = batch | {TEACHER_HIDDEN: teacher.hidden(batch)}
    hidden = student.model(**inputs(batch)).last_hidden_state.detach().requires_grad_(True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = distillation_loss(hidden, student.get_output_embeddings(), batch,
                                    LossConfig(weights={"forward_kl": 1.0, "jsd": 1.0}, targets="online",
                                               chunk_positions=16), teacher_head=teacher.logits)
    assert int(batch["loss_mask"].sum()) > 3 * 16  # several chunks
    assert sum(saved) < 16 * 32000, saved  # less than one chunk of logits of either model
    assert all(p.grad is None for p in teacher.lm.model.parameters())
    loss.backward()
    assert hidden.grad is not None and all(p.grad is None for p in teacher.lm.model.parameters())


def _args(store: Path, student: Path, output: Path, teacher: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--student", str(student), "--output", str(output), "--online-teacher",
            str(teacher), "--batch-size", "3", "--max-steps", "4", "--lr", "1e-2", "--eval-fraction", "0.2",
            "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]


def _records(output: Path) -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]


def test_cli_trains_online_and_saves_the_student_alone(tmp_path, store, student_config, llama_dir):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, _args(store, student_config, run, llama_dir, "--alpha", "1"))
    assert result.exit_code == 0, result.output
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["forward_kl"] > 0 and r["loss"] == pytest.approx(r["forward_kl"], rel=1e-6) for r in records)
    assert records[-1]["forward_kl"] < records[0]["forward_kl"]
    resolved = json.loads((run / "train_config.json").read_text())
    assert (resolved["targets_from"], resolved["online_teacher"]) == ("online", str(llama_dir))

    # The saved student and its checkpoints hold the student's parameters, nothing of the teacher.
    student = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(student_config))
    expected = {name: tuple(p.shape) for name, p in student.state_dict().items()}
    for weights in (run / "model.safetensors", run / "checkpoints" / "step-0000004" / "model" / "model.safetensors"):
        with safe_open(weights, "pt") as f:
            assert {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()} == expected
    optim = read_state_file(run / "checkpoints" / "step-0000004" / OPTIMIZER)["optimizer"]
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == student.num_parameters()
    assert sorted(p.name for p in (run / "checkpoints" / "step-0000004").iterdir()) == [
        "model", OPTIMIZER, RNG, "state.json"]


def test_resumed_online_run_continues_exactly(tmp_path, store, student_config, llama_dir, monkeypatch):
    """Cut after the step-2 checkpoint; the resumed run loads the teacher again and its steps 3-4 are the same."""
    CliRunner().invoke(main, _args(store, student_config, tmp_path / "full", llama_dir, "--loss", "jsd=1"))
    config = TrainConfig(store=str(store), student=str(student_config), output=str(tmp_path / "cut"),
                         online_teacher=str(llama_dir), loss=["jsd=1"], batch_size=3, max_steps=4, lr=1e-2,
                         eval_fraction=0.2, eval_every=2, save_every=2, log_every=1, device="cpu", seed=3)
    train_killed(monkeypatch, config, completed=2)
    result = CliRunner().invoke(main, _args(store, student_config, tmp_path / "cut", llama_dir, "--loss", "jsd=1",
                                            "--resume"))
    assert result.exit_code == 0, result.output
    full, resumed = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        for key in ("loss", "jsd", "ce", "tokens", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory) -> Path:
    """The store teacher's tokenizer, a wider head: a vocabulary other than the store's."""
    return make_llama(tmp_path_factory.mktemp("wide-teacher"), vocab_size=32064)


@pytest.mark.parametrize("extra,message", [
    (("--alpha", "0"), "does not use the teacher"),
    (("--targets-from", "topk_tail"), "give one of them"),
    (("--top-k", "4"), "--top-k 4: narrows the store's top-k targets"),
    (("--loss", "reverse_kl=1"), None),  # the same vocabulary: allowed (trains below)
])
def test_cli_refuses_what_online_kd_cannot_do(tmp_path, store, student_config, llama_dir, extra, message):
    args = _args(store, student_config, tmp_path / "run", llama_dir, *extra, "--max-steps", "1")
    result = CliRunner().invoke(main, args)
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_teacher_the_store_does_not_know(tmp_path, store, student_config, wide_teacher, llama_dir):
    def refused(*args: str) -> str:
        result = CliRunner().invoke(main, ["--store", str(store), "--student", str(student_config), "--output",
                                           str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu", *args])
        assert result.exit_code == 2, result.output
        assert not (tmp_path / "run").exists()
        return result.output

    output = refused("--online-teacher", str(wide_teacher))
    assert "vocab size mismatch" in output and "32064" in output and str(llama_dir) in output
    assert "no such directory" in refused("--online-teacher", str(tmp_path / "nowhere"))
    assert "name it with --online-teacher" in refused("--targets-from", "online")

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["another tokenizer"] * 10,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"]))
    other = make_llama(tmp_path / "other")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        other)
    output = refused("--online-teacher", str(other))
    assert "tokenizer mismatch" in output and f"the online teacher {other}" in output


def test_yaml_online_teacher(tmp_path, llama_dir):
    from student_train.config_file import resolve_options

    path = tmp_path / "online.yaml"
    path.write_text(f"online_teacher: {llama_dir}\nloss: {{jsd: 0.9, ce: 0.1}}\ntemperature: 2\n")
    options, _ = resolve_options(str(path), ["store=s", "student=t", "output=o"], {})
    config = TrainConfig(**options)
    assert (config.online_teacher, config.targets_from, config.loss) == (str(llama_dir), "online",
                                                                         ["jsd=0.9", "ce=0.1"])
    assert config.loss_config(config.targets_from).targets == "online"
