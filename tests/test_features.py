"""Feature distillation: the loss against a hand computation with and without a projection, its gradients, the
layer map, and a training run on a store of teacher hidden states (loss falls, projections live in checkpoints and
not in the saved student, resume is exact, bad maps are clear errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, make_student_config, train_killed
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from student_train.checkpoint import FEATURE_HEAD, latest_checkpoint, load_checkpoint, read_state_file
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.features import FeatureProjector, parse_layer_map, resolve_layer_map, uniform_layer_map
from student_train.train import Trainer, train

B, L = 3, 7


def _inputs(student_width: int, teacher_width: int, teacher_layers=(1, 2), seed: int = 0):
    """Student hidden states of 3 layers (requiring grad), a batch with the teacher's layers and a ragged mask."""
    generator = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(B, L, student_width, generator=generator, requires_grad=True) for _ in range(3))
    mask_BL = torch.rand(B, L, generator=generator) < 0.6
    mask_BL[0, 0] = mask_BL[1, -1] = True
    mask_BL[2, 1] = False
    batch = {"loss_mask": mask_BL}
    for t in teacher_layers:
        batch[f"hidden_states_{t}"] = torch.randn(B, L, teacher_width, generator=generator) * mask_BL[..., None]
    return states, batch


def _by_hand(kind: str, student_BLG: torch.Tensor, teacher_BLG: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions, one position at a time."""
    values = []
    for b, t in mask_BL.nonzero().tolist():
        s, g = student_BLG[b, t].detach().double(), teacher_BLG[b, t].double()
        if kind == "mse":
            values.append(sum((s[i] - g[i]) ** 2 for i in range(len(s))) / len(s))
        else:
            values.append(1 - s @ g / (s @ s).sqrt() / (g @ g).sqrt())
    return sum(values) / len(values)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_without_projection_is_the_masked_mean(kind):
    states, batch = _inputs(8, 8)
    head = FeatureProjector([(1, 1), (2, 2)], kind=kind, student_width=8, teacher_width=8)
    assert all(isinstance(p, torch.nn.Identity) for p in head.projections) and not list(head.parameters())
    expected = sum(_by_hand(kind, states[i], batch[f"hidden_states_{i}"], batch["loss_mask"]) for i in (1, 2)) / 2
    assert float(head(states, batch).detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_through_the_projection(kind):
    states, batch = _inputs(8, 12, teacher_layers=(2, 4))
    head = FeatureProjector([(1, 4), (2, 2), (0, 2)], kind=kind, student_width=8, teacher_width=12)
    assert [tuple(p.weight.shape) for p in head.projections] == [(12, 8)] * 3
    expected = 0.0
    for (s, t), projection in zip(head.layer_map, head.projections, strict=True):
        projected = states[s].detach() @ projection.weight.detach().T + projection.bias.detach()
        expected += _by_hand(kind, projected, batch[f"hidden_states_{t}"], batch["loss_mask"]) / 3
    assert float(head(states, batch).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_forced_projection_and_gradients_reach_projection_and_student():
    states, batch = _inputs(8, 8)
    head = FeatureProjector([(2, 2)], kind="mse", student_width=8, teacher_width=8, project="always")
    assert isinstance(head.projections[0], torch.nn.Linear)
    head(states, batch).backward()
    assert head.projections[0].weight.grad.abs().sum() > 0 and head.projections[0].bias.grad.abs().sum() > 0
    grad_BL = states[2].grad.abs().sum(-1)
    mask_BL = batch["loss_mask"]
    assert (grad_BL[mask_BL] > 0).all() and (grad_BL[~mask_BL] == 0).all()  # untrained positions get nothing
    assert states[1].grad is None  # an unmapped layer


def test_uniform_layer_map_keeps_relative_depth():
    assert uniform_layer_map([0, 6, 12], teacher_depth=12, student_depth=4) == [(0, 0), (2, 6), (4, 12)]
    assert uniform_layer_map([3, 9], teacher_depth=12, student_depth=4) == [(1, 3), (3, 9)]
    assert uniform_layer_map([5, 7], teacher_depth=12, student_depth=6) == [(3, 5), (4, 7)]  # 2.5 -> 3, 3.5 -> 4
    assert uniform_layer_map([1, 2], teacher_depth=2, student_depth=1) == [(1, 1), (1, 2)]
    assert uniform_layer_map([2, 4], teacher_depth=4, student_depth=4) == [(2, 2), (4, 4)]
    assert resolve_layer_map(None, stored=[1, 2], teacher_depth=2, student_depth=4) == [(2, 1), (4, 2)]


def test_layer_maps_given_and_their_errors():
    assert parse_layer_map("1:2, 2:4") == [(1, 2), (2, 4)] == parse_layer_map([[1, 2], [2, 4]])
    assert resolve_layer_map([(-1, -1), (0, 1)], stored=[1, 4], teacher_depth=4, student_depth=2) == [(2, 4), (0, 1)]
    for bad in ("1-2", "1:2:3", "", "a:b"):
        with pytest.raises(ValueError, match="STUDENT:TEACHER"):
            parse_layer_map(bad)
    with pytest.raises(ValueError, match=r"layer\(s\) 0, 3 are not in the store, which holds layers 1, 4.*"
                                         r"--hidden-layers 0,1,3,4"):
        resolve_layer_map([(1, 3), (1, 0), (2, 4)], stored=[1, 4], teacher_depth=4, student_depth=2)
    with pytest.raises(ValueError, match="the student has 3 hidden states"):
        resolve_layer_map([(3, 4)], stored=[4], teacher_depth=4, student_depth=2)
    with pytest.raises(ValueError, match="no teacher hidden states.*--hidden-layers"):
        resolve_layer_map(None, stored=[], teacher_depth=4, student_depth=2)


def test_config_checks_the_feature_options(tmp_path):
    base = dict(store="s", student="m", output=str(tmp_path))
    assert TrainConfig(**base, feature_loss="cosine", feature_layers="1:2,2:-1").feature_layers == [[1, 2], [2, -1]]
    with pytest.raises(ValueError, match="--feature-loss mse"):
        TrainConfig(**base, feature_layers="1:2")
    with pytest.raises(ValueError, match="--feature-weight"):
        TrainConfig(**base, feature_loss="mse", feature_weight=0.0)
    with pytest.raises(ValueError, match="--feature-loss: 'l1'"):
        TrainConfig(**base, feature_loss="l1")


# --- training on a store of hidden states ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """The tiny teacher (2 blocks, width 64) with its hidden states after block 1 and after the final norm."""
    root = tmp_path_factory.mktemp("feature-store")
    return make_small_store(root, llama_dir, corpus_texts[:40], hidden_layers=(1, -1))


@pytest.fixture(scope="module")
def narrow_student(tmp_path_factory, llama_dir) -> Path:
    """A random student half the teacher's width (32), with its tokenizer."""
    path = tmp_path_factory.mktemp("narrow-student")
    make_student_config(path, llama_dir, layers=2)
    return path


def _config(store: Path, student: Path, output: Path, **overrides) -> TrainConfig:
    options = dict(store=str(store), student=str(student), output=str(output), batch_size=4, max_steps=8, lr=1e-2,
                   eval_fraction=0.2, eval_every=100, save_every=4, log_every=1, device="cpu", seed=3,
                   feature_loss="mse")
    return TrainConfig(**{**options, **overrides})


def _train_records(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval" not in r]


def test_feature_loss_trains_projections_kept_out_of_the_student(tmp_path, store, narrow_student):
    trainer = Trainer(_config(store, narrow_student, tmp_path / "run", feature_weight=0.5))
    assert trainer.feature_head.layer_map == [(1, 1), (2, 2)]  # uniform: the same depths
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in trainer.feature_head.parameters())
    trainer.run()

    records = _train_records(tmp_path / "run")
    feature = [r["feature"] for r in records]
    assert len(feature) == 8 and sum(feature[-3:]) < 0.85 * sum(feature[:3]), feature
    for r in records:
        assert r["loss"] == pytest.approx(0.9 * r["kd"] + 0.1 * r["ce"] + 0.5 * r["feature"], rel=1e-5)

    saved = read_state_file(latest_checkpoint(tmp_path / "run") / FEATURE_HEAD)
    assert {name: tuple(value.shape) for name, value in saved.items() if name != "_extra_state"} == {
        "projections.0.weight": (64, 32), "projections.0.bias": (64,),
        "projections.1.weight": (64, 32), "projections.1.bias": (64,)}
    assert saved["_extra_state"] == {"layer_map": [[1, 1], [2, 2]], "kind": "mse"}

    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not [name for name in names if "projection" in name]
    assert not list((tmp_path / "run").glob("*feature*"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    fresh = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(narrow_student))
    assert model.num_parameters() == fresh.num_parameters() and model.config.hidden_size == 32


def test_resume_with_feature_loss_continues_exactly(tmp_path, store, narrow_student, monkeypatch):
    """Stop after the step-3 checkpoint; the resumed run's steps 4-6 equal an uninterrupted run's, projections too."""
    options = dict(feature_loss="cosine", feature_layers="2:2,1:1,0:1", feature_projection="always", max_steps=6,
                   save_every=3)
    train(_config(store, narrow_student, tmp_path / "full", **options))
    full = _train_records(tmp_path / "full")

    # Step 5 starts; step 4 ran after the step-3 checkpoint and is lost.
    train_killed(monkeypatch, _config(store, narrow_student, tmp_path / "cut", **options), completed=4)
    train(_config(store, narrow_student, tmp_path / "cut", resume=True, **options))
    resumed = _train_records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed, strict=True):
        for key in ("loss", "kd", "ce", "feature", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    heads = [read_state_file(latest_checkpoint(tmp_path / run) / FEATURE_HEAD) for run in ("full", "cut")]
    assert heads[0].keys() == heads[1].keys()
    for name, value in heads[0].items():
        if name != "_extra_state":
            torch.testing.assert_close(heads[1][name], value, rtol=1e-5, atol=1e-6)
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-5, atol=1e-6)


def test_checkpoint_refuses_other_feature_options(tmp_path, store, narrow_student):
    """A checkpoint with projections needs them to load into, of the same layer map and loss; and the other way."""
    train(_config(store, narrow_student, tmp_path / "run", max_steps=1))
    checkpoint = latest_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="written with a feature loss and this run is without one"):
        load_checkpoint(checkpoint, model=None, optimizer=None, scheduler=None)
    other = FeatureProjector([(2, 2)], kind="mse", student_width=32, teacher_width=64)
    with pytest.raises(ValueError, match=r"layer map \(student, teacher\) \[\[1, 1\], \[2, 2\]\], this run's is "
                                         r"mse over \[\[2, 2\]\]"):
        other.load_state_dict(read_state_file(checkpoint / FEATURE_HEAD))
    (checkpoint / FEATURE_HEAD).unlink()
    with pytest.raises(ValueError, match="written without a feature loss and this run is with one"):
        load_checkpoint(checkpoint, model=None, optimizer=None, scheduler=None, feature_head=other)


def test_cli_feature_options_and_a_layer_the_store_lacks(tmp_path, store, narrow_student):
    args = ["--store", str(store), "--student", str(narrow_student), "--max-steps", "1", "--batch-size", "4",
            "--device", "cpu", "--feature-loss", "cosine", "--feature-weight", "2"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "run"), "--feature-layers", "2:-1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["feature_loss"], saved["feature_weight"], saved["feature_layers"]) == ("cosine", 2.0, [[2, -1]])
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "bad"), "--feature-layers", "1:0"])
    assert result.exit_code == 2
    assert "teacher layer(s) 0 are not in the store, which holds layers 1, 2" in result.output
    assert "--hidden-layers 0,1,2" in result.output
