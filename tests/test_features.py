"""Feature distillation: the loss against a hand computation with and without a projection, its gradients, and the
layer map with its errors."""

from __future__ import annotations

import pytest
import torch

from student_train.features import FeatureProjector, parse_layer_map, resolve_layer_map, uniform_layer_map

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
