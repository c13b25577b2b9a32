"""Integrity of training runs on disk: checkpoints hold no pickle and restore every state exactly, an old pickle
checkpoint is refused without being unpickled, and what an interrupted run leaves behind (staging directories, a torn
metrics line) does not block --resume; a bad --output or a store too small for its held-out split is a clear error
before the student loads."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from student_train import train as train_module
from student_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.features import FeatureProjector
from student_train.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("integrity-store"), llama_dir, corpus_texts[:40])


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("integrity-student"), llama_dir)


def _config(store: Path, student: Path, output: Path, **overrides) -> TrainConfig:
    options = dict(store=str(store), student=str(student), output=str(output), batch_size=4, max_steps=2, lr=1e-2,
                   eval_fraction=0.2, eval_every=2, save_every=2, log_every=1, device="cpu", seed=3)
    return TrainConfig(**{**options, **overrides})


def _args(store: Path, student: Path, output: Path) -> list[str]:
    return ["--store", str(store), "--student", str(student), "--output", str(output), "--batch-size", "4",
            "--max-steps", "2", "--lr", "0.01", "--eval-fraction", "0.2", "--eval-every", "2", "--save-every", "2",
            "--log-every", "1", "--device", "cpu", "--seed", "3"]


def _finished_run(tmp_path: Path, store: Path, student: Path) -> Path:
    """A finished 2-step run, with a checkpoint at its last step."""
    train(_config(store, student, tmp_path / "run"))
    return tmp_path / "run"


def _student_must_not_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the student was loaded before the check")

    monkeypatch.setattr(train_module, "build_student", refuse)


# --- checkpoints: safetensors and JSON, exact round trip ---------------------------------------------------------


def _tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def _trainable(seed: int):
    """A model, feature projections, AdamW over both (two groups) and a LambdaLR, as the trainer builds them."""
    model = _tiny_model(seed)
    head = FeatureProjector([(1, 1)], kind="mse", student_width=16, teacher_width=24)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, head, optimizer, scheduler


def _draws() -> tuple:
    """The next numbers of each random generator a run uses."""
    return (random.random(), random.getrandbits(64), float(np.random.rand()), float(np.random.randn()),
            torch.rand(4).tolist(), torch.randn(3).tolist())


def _assert_identical(a, b, where: str = "") -> None:
    """Equal values of equal types, nested; tensors of equal dtype and bits."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}/{index}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def test_checkpoint_round_trip_restores_every_state_exactly(tmp_path):
    model, head, optimizer, scheduler = _trainable(seed=0)
    for _ in range(3):
        loss = sum((p.float() ** 2).sum() for p in [*model.parameters(), *head.parameters()])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    _draws()  # a Gaussian cached in numpy's state, the generators away from their seeds
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scheduler_state = copy.deepcopy(scheduler.state_dict())
    head_state = copy.deepcopy(head.state_dict())
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    expected_draws = _draws()
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])

    path = save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler,
                           loader_state={"world_size": 1}, keep=2, feature_head=head)
    _draws()
    fresh_model, fresh_head, fresh_optimizer, fresh_scheduler = _trainable(seed=1)
    state = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                            feature_head=fresh_head)

    assert state["step"] == 3 and state["loader"] == {"world_size": 1}
    assert _draws() == expected_draws
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
    load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                    feature_head=fresh_head)
    _assert_identical(random.getstate(), rng[0])
    _assert_identical(np.random.get_state(), rng[1])
    _assert_identical(torch.get_rng_state(), rng[2])
    _assert_identical(fresh_optimizer.state_dict(), optimizer_state)
    _assert_identical(fresh_scheduler.state_dict(), scheduler_state)
    _assert_identical(fresh_head.state_dict(), head_state)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], value), name
    # Nothing in it is a pickle: every file is JSON or safetensors.
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".safetensors", file
            with safe_open(file, "pt"):
                pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for its generator state")
def test_checkpoint_restores_the_cuda_generator(tmp_path):
    model, _, optimizer, scheduler = _trainable(seed=0)
    torch.cuda.manual_seed_all(11)
    torch.rand(5, device="cuda")
    taken = torch.cuda.get_rng_state_all()
    expected = torch.rand(5, device="cuda").cpu()
    torch.cuda.set_rng_state_all(taken)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                           loader_state={}, keep=1)
    torch.rand(7, device="cuda")
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert torch.equal(torch.rand(5, device="cuda").cpu(), expected)


class _Payload:
    """Unpickling it creates `marker`: what a planted checkpoint file could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_old_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, store, student):
    output = _finished_run(tmp_path, store, student)
    checkpoint = latest_checkpoint(output)
    marker = tmp_path / "payload-ran"
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "version": 1}))
    for name in ("optim.pt", "rng.pt"):
        torch.save({"optimizer": _Payload(marker), "scheduler": _Payload(marker)}, checkpoint / name)

    result = CliRunner().invoke(main, [*_args(store, student, output), "--resume"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in (str(checkpoint), "older release", "pickle", "can run code", "release that wrote it",
                     f"--student {checkpoint / 'model'}"):
        assert fragment in result.output, (fragment, result.output)
    with pytest.raises(RuntimeError, match="pickle"):
        load_checkpoint(checkpoint, model=None, optimizer=None, scheduler=None)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optim.safetensors", "rng.safetensors", "state.json"])
def test_damaged_checkpoint_file_is_named_with_the_way_to_go_on(tmp_path, store, student, name):
    output = _finished_run(tmp_path, store, student)
    checkpoint = latest_checkpoint(output)
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut short, as a full disk would leave it

    result = CliRunner().invoke(main, [*_args(store, student, output), "--resume"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in (f"{path} is damaged", f"Delete {checkpoint}", "new --output"):
        assert fragment in result.output, (fragment, result.output)


def test_no_module_unpickles_files():
    """No code of the package loads a pickle, and the trainer writes none."""
    unsafe = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\b|Unpickler")
    written = re.compile(r"\bimport pickle\b|\bfrom pickle\b|torch\.save\(|torch\.load\(")
    found = []
    for package in ("student_train", "storage", "teacher_cache", "tools"):
        for source in sorted((REPO / package).rglob("*.py")):
            text = source.read_text()
            found += [f"{source.relative_to(REPO)}: {m.group()}" for m in unsafe.finditer(text)]
            if package == "student_train":
                found += [f"{source.relative_to(REPO)}: {m.group()}" for m in written.finditer(text)]
    assert not found


# --- what an interrupted run leaves behind --------------------------------------------------------------------------


def test_resume_removes_stale_staging_directories(tmp_path, store, student, caplog):
    output = _finished_run(tmp_path, store, student)
    root = output / "checkpoints"
    stale = [root / ".tmp-step-0000003-4242", root / ".tmp-step-0000002-17"]
    for path in stale:
        (path / "model").mkdir(parents=True)
        (path / "model" / "config.json").write_text("{")
    kept = [*sorted(root.glob("step-*")), root / "notes.txt"]
    (root / "notes.txt").write_text("mine")

    with caplog.at_level(logging.INFO):
        train(_config(store, student, output, resume=True))
    assert sorted(root.iterdir()) == sorted(kept)
    for path in stale:
        assert any(str(path) in record.getMessage() for record in caplog.records), path


def _metrics_lines(output: Path) -> list[str]:
    return (output / "metrics.jsonl").read_text().splitlines(keepends=True)


def test_resume_drops_a_torn_last_metrics_line(tmp_path, store, student, caplog):
    output = _finished_run(tmp_path, store, student)
    before = _metrics_lines(output)
    assert [json.loads(line).get("step") for line in before] == [1, 2, None]  # step 1, step 2, eval at 2
    # Step 3 ran after the step-2 checkpoint; the kill came in the middle of step 4's record.
    torn = '{"step": 3, "loss": 1.5, "kd": 1.0, "ce": 2.0, "tokens": 9}\n{"step": 4, "loss": 1.'
    (output / "metrics.jsonl").write_text("".join(before) + torn)

    with caplog.at_level(logging.WARNING):
        train(_config(store, student, output, resume=True))
    assert _metrics_lines(output) == before  # resumed at its last step: nothing more to write
    assert any("metrics.jsonl" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_resume_refuses_a_malformed_metrics_line_before_the_last(tmp_path, store, student):
    output = _finished_run(tmp_path, store, student)
    lines = _metrics_lines(output)
    text = "".join([lines[0], '{"step": 2, "lo\n', *lines[1:]])
    (output / "metrics.jsonl").write_text(text)

    result = CliRunner().invoke(main, [*_args(store, student, output), "--resume"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in (str(output / "metrics.jsonl"), "line 2"):
        assert fragment in result.output, (fragment, result.output)
    assert (output / "metrics.jsonl").read_text() == text


# --- --output and the store's split, checked before the student loads ------------------------------------------------


def test_output_naming_a_file_is_a_usage_error(tmp_path, store, student, monkeypatch):
    output = tmp_path / "results.txt"
    output.write_text("not a run")
    _student_must_not_load(monkeypatch)
    result = CliRunner().invoke(main, _args(store, student, output))
    assert result.exit_code == 2, result.output
    for fragment in (str(output), "is a file", "--output"):
        assert fragment in result.output, (fragment, result.output)
    assert output.read_text() == "not a run"


def test_output_on_a_read_only_directory_is_a_usage_error(tmp_path, store, student, monkeypatch):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes whatever the permission bits say; answer as they would for a user
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            not (Path(path) == read_only and mode & os.W_OK) and access(path, mode, **kw)))
    _student_must_not_load(monkeypatch)
    output = read_only / "run"
    result = CliRunner().invoke(main, _args(store, student, output))
    read_only.chmod(0o755)
    assert result.exit_code == 2, result.output
    for fragment in (str(output), str(read_only), "not writable", "--output"):
        assert fragment in result.output, (fragment, result.output)
    assert not output.exists()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """A store of 8 samples."""
    return make_small_store(tmp_path_factory.mktemp("tiny-store"), llama_dir, corpus_texts[:40], max_samples=8)


@pytest.mark.parametrize(("options", "fragments"), [
    # round(8 x 0.05) = 0: nothing held out to evaluate on.
    ([], ["8 samples", "holds out the last 0", "leaving 8 for training", "--eval-fraction 0.05"]),
    # round(8 x 0.25) = 2 held out, 6 left: not a batch of 8.
    (["--eval-fraction", "0.25"], ["8 samples", "holds out the last 2", "leaving 6 for training", "--batch-size 8"]),
])
def test_store_too_small_for_its_held_out_split_names_the_split(tmp_path, tiny_store, student, monkeypatch, options,
                                                                fragments):
    _student_must_not_load(monkeypatch)
    result = CliRunner().invoke(main, ["--store", str(tiny_store), "--student", str(student), "--output",
                                       str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu", *options])
    assert result.exit_code == 2, result.output
    for fragment in [*fragments, "--eval-fraction 0 --eval-store", "smaller --batch-size", "bigger store"]:
        assert fragment in result.output, (fragment, result.output)


def test_store_of_8_samples_trains_with_a_separate_eval_store(tmp_path, tiny_store, student):
    """The control of the case above: the fix the message names works."""
    evaluation = train(TrainConfig(store=str(tiny_store), student=str(student), output=str(tmp_path / "run"),
                                   max_steps=1, device="cpu", eval_fraction=0.0, eval_store=str(tiny_store)))
    assert evaluation["tokens"] > 0
