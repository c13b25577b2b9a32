"""The on-policy reverse KL `rollout_rkl` against its expectation, computed by brute force in float64.

The student is a hidden state h and a random linear head (vocabulary V); the teacher p and the generator mu are
hand-made distributions over the same V ids. One rollout position per id x, each with the same h, x as its next
token, log p(x) as `true_logprob` and log mu(x) as `behaviour_logprob`, gives the per-position losses and gradients;
their mu-weighted sums are the estimator's expectation over x ~ mu, which must be KL(q || p) and its gradient
(the importance weights q / mu unclipped), or sum_x mu(x) min(q(x) / mu(x), C) (log q(x) - log p(x)) grad log q(x)
with a small clip C. Both loss paths are checked: "fused" stays in float64 after a float64 head (exact comparisons),
"checkpoint" computes in fp32 (fp32 tolerances). Then: weights of 1 when the student has not changed since it
generated, undrawn positions (NaN behaviour log-prob) adding nothing, mixes with CE and a divergence, and the
refused configurations, through the trainer and the CLI too.

Legend: B batch, L positions per row, H hidden size, V vocabulary, P trained positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from test_losses import make_case
from torch import nn

from student_train.cli import main
from student_train.config import TrainConfig
from student_train.loss_config import LossConfig, kd_scale
from student_train.losses import distillation_loss

H, V = 8, 24
IMPLS = ("fused", "checkpoint")
# "fused" keeps a float64 head's logits in float64; "checkpoint" computes every chunk in fp32.
TOLERANCE = {"fused": dict(rtol=1e-9, atol=1e-12), "checkpoint": dict(rtol=2e-5, atol=1e-6)}


def student(seed: int) -> tuple[torch.Tensor, nn.Linear]:
    """A hidden state [H] (a leaf requiring gradients) and a head H -> V, in float64."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen, dtype=torch.float64))
        head.bias.copy_(torch.randn(V, generator=gen, dtype=torch.float64))
    return torch.randn(H, generator=gen, dtype=torch.float64).requires_grad_(True), head


def log_distribution(seed: int, sharpness: float = 1.5) -> torch.Tensor:
    """A random distribution over V ids, log-probs [V] in float64."""
    gen = torch.Generator().manual_seed(seed)
    return F.log_softmax(sharpness * torch.randn(V, generator=gen, dtype=torch.float64), -1)


def rollout_config(impl: str, weight: float = 1.0, **options) -> LossConfig:
    return LossConfig(weights={"rollout_rkl": weight}, impl=impl, **options)


def per_position(h, head, x: int, logp_V, logmu_V, config: LossConfig, step: int = 0):
    """(loss, metrics, gradients w.r.t. h, weight, bias) of a batch of one trained position whose next token is x."""
    batch = {"loss_mask": torch.ones(1, 1, dtype=torch.bool), "input_ids": torch.tensor([[0, x]]),
             "true_logprob": logp_V[x].view(1, 1), "behaviour_logprob": logmu_V[x].view(1, 1)}
    loss, metrics = distillation_loss(h.view(1, 1, H), head, batch, config, step=step)
    return loss, metrics, torch.autograd.grad(loss, [h, head.weight, head.bias])


def expectation(h, head, logp_V, logmu_V, config: LossConfig, step: int = 0):
    """The mu-weighted sums over every id x of the per-position loss, "rollout_rkl" metric and gradients."""
    mu_V = logmu_V.exp()
    loss = metric = 0.0
    grads = [torch.zeros_like(t) for t in (h, head.weight, head.bias)]
    for x in range(V):
        loss_x, metrics_x, grads_x = per_position(h, head, x, logp_V, logmu_V, config, step)
        loss, metric = loss + mu_V[x] * loss_x.double(), metric + mu_V[x] * metrics_x["rollout_rkl"].double()
        grads = [g + mu_V[x] * g_x.double() for g, g_x in zip(grads, grads_x, strict=True)]
    return loss, metric, grads


def exact_reverse_kl(h, head, logp_V):
    """KL(q || p) = sum_x q (log q - log p), q = softmax(head(h)), and its gradients, by autograd in float64."""
    logq_V = F.log_softmax(head(h), -1)
    value = (logq_V.exp() * (logq_V - logp_V)).sum()
    return value.detach(), torch.autograd.grad(value, [h, head.weight, head.bias])


def clipped_expectation(h, head, logp_V, logmu_V, clip: float):
    """sum_x mu(x) w(x) a(x) and sum_x mu(x) w(x) a(x) grad log q(x), with a = log q - log p and
    w = min(q / mu, clip), over the whole vocabulary in float64."""
    logq_V = F.log_softmax(head(h), -1)
    mu_V, q_V = logmu_V.exp(), logq_V.exp().detach()
    coef_V = mu_V * torch.minimum(q_V / mu_V, torch.tensor(clip, dtype=torch.float64)) * (logq_V.detach() - logp_V)
    return coef_V.sum(), torch.autograd.grad((coef_V * logq_V).sum(), [h, head.weight, head.bias])


def assert_close(actual, expected, impl: str, msg: str = ""):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               **TOLERANCE[impl], msg=msg or None)


@pytest.mark.parametrize("impl", IMPLS)
def test_value_is_the_reverse_kl_in_expectation(impl):
    """With mu = q (weights of 1) and with mu != q (weights q / mu, unclipped), E_mu[loss] = s w KL(q || p)."""
    h, head = student(0)
    logp_V = log_distribution(1)
    kl, _ = exact_reverse_kl(h, head, logp_V)
    assert kl > 0.1  # not trivially zero
    weight, schedule, step = 0.7, "linear_warmup:4", 1
    scale = kd_scale(schedule, step)
    assert scale == 0.5
    config = rollout_config(impl, weight, kd_schedule=schedule, rollout_clip=1e9)
    on_policy = F.log_softmax(head(h), -1).detach()
    off_policy = log_distribution(2)
    assert (on_policy - off_policy).abs().max() > 0.5
    for logmu_V in (on_policy, off_policy):
        loss, metric, _ = expectation(h, head, logp_V, logmu_V, config, step)
        assert_close(metric, kl, impl)
        assert_close(loss, scale * weight * kl, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_is_the_reverse_kl_gradient_in_expectation(impl):
    """Unclipped: E_mu[grad] = grad KL(q || p) w.r.t. the hidden state and the head; with a small clip, the clipped
    expectation sum_x mu min(q / mu, C) (log q - log p) grad log q, which differs from it."""
    h, head = student(3)
    logp_V, logmu_V = log_distribution(4), log_distribution(5)
    _, kl_grads = exact_reverse_kl(h, head, logp_V)
    _, _, grads = expectation(h, head, logp_V, logmu_V, rollout_config(impl, rollout_clip=1e9))
    for grad, expected, name in zip(grads, kl_grads, ("hidden", "weight", "bias"), strict=True):
        assert_close(grad, expected, impl, name)

    clip = 1.5
    ratio_V = (F.log_softmax(head(h), -1).detach() - logmu_V).exp()
    assert (ratio_V > 2 * clip).any() and (ratio_V < clip).any()  # some weights truncated, some not
    value, clipped_grads = clipped_expectation(h, head, logp_V, logmu_V, clip)
    loss, metric, grads = expectation(h, head, logp_V, logmu_V, rollout_config(impl, rollout_clip=clip))
    assert_close(loss, value, impl)
    assert_close(metric, value, impl)
    for grad, expected, kl_grad, name in zip(grads, clipped_grads, kl_grads, ("hidden", "weight", "bias"),
                                             strict=True):
        assert_close(grad, expected, impl, name)
        assert (expected - kl_grad).abs().max() > 1e-3  # the truncation is seen


def rollout_batch(seed: int, *, length: int = 6):
    """Hidden states [2, L, H] and a head in float64, teacher and current student log-probs [2, L, V], and a batch
    (loss mask with some positions off, next tokens, the teacher's `true_logprob` at them)."""
    gen = torch.Generator().manual_seed(seed)
    _, head = student(seed)
    hidden = torch.randn(2, length, H, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = F.log_softmax(1.5 * torch.randn(2, length, V, generator=gen, dtype=torch.float64), -1)
    ids = torch.randint(V, (2, length + 1), generator=gen)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, 1] = mask[1, -1] = False
    true = ids[:, 1:, None]
    batch = {"loss_mask": mask, "input_ids": ids, "true_logprob": teacher.gather(-1, true)[..., 0].float()}
    logq = F.log_softmax(head(hidden), -1).detach().gather(-1, true)[..., 0]
    return hidden, head, batch, logq


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_is_one_when_the_student_has_not_changed(impl):
    """Behaviour log-probs = the student's current ones: "rollout_weight" is 1 (the clip does not matter) and the
    loss is the plain mean of log q(x) - log p(x) over the trained positions."""
    hidden, head, batch, logq = rollout_batch(6)
    batch["behaviour_logprob"] = logq.float()  # as the store keeps it
    mask = batch["loss_mask"]
    advantage = (logq - batch["true_logprob"].double())[mask]
    for clip in (1.0, 2.0):
        loss, metrics = distillation_loss(hidden, head, batch, rollout_config(impl, rollout_clip=clip))
        fp32 = dict(rtol=1e-5, atol=1e-6)  # the stored log-probs are fp32
        torch.testing.assert_close(metrics["rollout_weight"].double(), torch.tensor(1.0, dtype=torch.float64), **fp32)
        torch.testing.assert_close(loss.double(), advantage.mean(), **fp32)
        torch.testing.assert_close(metrics["rollout_rkl"].double(), advantage.mean(), **fp32)
        assert int(metrics["tokens"]) == int(mask.sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_undrawn_positions_add_nothing(impl):
    """Positions with a NaN behaviour log-prob (prompt, appended EOS, padding: their teacher log-prob may be NaN too)
    add 0 to the loss and nothing to the gradients, and count among the P positions the sum is divided by; the mean
    weight is over the drawn positions only."""
    hidden, head, batch, logq = rollout_batch(7)
    gen = torch.Generator().manual_seed(8)
    behaviour = (logq + 1.5 * torch.randn(logq.shape, generator=gen, dtype=torch.float64)).float()
    undrawn = torch.zeros_like(batch["loss_mask"])
    undrawn[0, :2] = undrawn[1, 3] = True  # (0, 0) trained, (0, 1) not, (1, 3) trained
    behaviour[undrawn] = math.nan
    batch["true_logprob"][1, 3] = math.nan
    batch["behaviour_logprob"] = behaviour
    mask, clip = batch["loss_mask"], 2.0
    drawn = mask & ~undrawn
    weight = torch.minimum((logq - behaviour.double()).exp(), torch.tensor(clip, dtype=torch.float64))[drawn]
    estimate = weight * (logq - batch["true_logprob"].double())[drawn]
    assert (weight == clip).any() and (weight < clip).any()

    config = rollout_config(impl, rollout_clip=clip)
    loss, metrics = distillation_loss(hidden, head, batch, config)
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    assert_close(loss, estimate.sum() / mask.sum(), impl)
    assert_close(metrics["rollout_rkl"], estimate.sum() / mask.sum(), impl)
    assert_close(metrics["rollout_weight"], weight.mean(), impl)
    assert all(bool(g.isfinite().all()) for g in (grad_hidden, grad_weight, grad_bias))
    assert (grad_hidden[undrawn] == 0).all() and (grad_hidden[drawn] != 0).any()

    # Dropping the undrawn positions from the loss mask changes only P.
    batch_drawn = batch | {"loss_mask": drawn}
    loss_drawn, _ = distillation_loss(hidden, head, batch_drawn, config)
    assert_close(loss_drawn * drawn.sum() / mask.sum(), loss, impl)


def mixed_case(seed: int):
    """`test_losses.make_case` in float64 with rollout records: the teacher's log-prob of each next token, and
    behaviour log-probs near the student's, NaN at a few positions."""
    hidden, head, teacher, batch = make_case(seed, length=9)
    hidden, head = hidden.detach().double().requires_grad_(True), head.double()
    true = batch["input_ids"][:, 1:, None]
    logq = F.log_softmax(head(hidden), -1).detach().gather(-1, true)[..., 0]
    gen = torch.Generator().manual_seed(seed)
    behaviour = (logq + torch.randn(logq.shape, generator=gen, dtype=torch.float64)).float()
    behaviour[0, 2] = behaviour[1, 0] = math.nan
    batch |= {"true_logprob": teacher.gather(-1, true)[..., 0].float(), "behaviour_logprob": behaviour}
    return hidden, head, batch


def run(hidden, head, batch, config: LossConfig):
    loss, metrics = distillation_loss(hidden, head, batch, config)
    return loss, metrics, torch.autograd.grad(loss, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("impl", IMPLS)
def test_mix_with_a_divergence_and_ce_adds_up(impl):
    """reverse_kl + rollout_rkl + ce is the sum of the three single-term losses (values, gradients, metrics), and
    rollout_rkl alone reads no top-k or sampled targets."""
    hidden, head, batch = mixed_case(9)
    weights = {"reverse_kl": 0.5, "rollout_rkl": 0.5, "ce": 0.3}
    loss, metrics, grads = run(hidden, head, batch, LossConfig(weights=weights, impl=impl))
    singles = {name: run(hidden, head, batch, LossConfig(weights={name: weight}, impl=impl))
               for name, weight in weights.items()}
    assert_close(loss, sum(single[0] for single in singles.values()), impl)
    for index, name in enumerate(("hidden", "weight", "bias")):
        assert_close(grads[index], sum(single[2][index] for single in singles.values()), impl, name)
    for name in ("reverse_kl", "rollout_rkl"):
        assert_close(metrics[name], singles[name][1][name], impl, name)
    assert_close(metrics["rollout_weight"], singles["rollout_rkl"][1]["rollout_weight"], impl)
    assert_close(metrics["kd"], (metrics["reverse_kl"] + metrics["rollout_rkl"]) / 2, impl)
    assert "rollout_weight" not in singles["reverse_kl"][1]
    assert abs(float(metrics["rollout_rkl"])) > 1e-3

    no_targets = {key: value for key, value in batch.items() if not key.startswith(("topk", "tail", "sampled"))}
    alone = run(hidden, head, no_targets, LossConfig(weights={"rollout_rkl": 0.5, "ce": 0.3}, impl=impl))
    assert_close(alone[0], singles["rollout_rkl"][0] + singles["ce"][0], impl)


def test_fused_equals_checkpoint_in_chunks():
    """The fused path gives the checkpointed path's loss, metrics and gradients, whatever the chunk size; under
    no_grad, the same values."""
    hidden, head, batch = mixed_case(10)
    hidden, head = hidden.detach().float().requires_grad_(True), head.float()
    weights = {"forward_kl": 0.4, "rollout_rkl": 0.6, "ce": 0.2}
    expected = run(hidden, head, batch, LossConfig(weights=weights, impl="checkpoint", rollout_clip=1.5))
    for size in (1, 4, 10_000):
        loss, metrics, grads = run(hidden, head, batch, LossConfig(weights=weights, chunk_positions=size,
                                                                   rollout_clip=1.5))
        torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
        assert metrics.keys() == expected[1].keys()
        for name in metrics:
            torch.testing.assert_close(metrics[name], expected[1][name], rtol=1e-5, atol=1e-6, msg=name)
        for grad, ref in zip(grads, expected[2], strict=True):
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        loss, metrics = distillation_loss(hidden, head, batch, LossConfig(weights=weights, rollout_clip=1.5))
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rollout_weight"], expected[1]["rollout_weight"], rtol=1e-5, atol=1e-6)


def test_refused_configs():
    for options, message in [
        ({"temperature": 2.0}, "untempered"),
        ({"targets": "online"}, "online targets"),
        ({"fused_ce": True}, "CE alone"),
    ]:
        with pytest.raises(ValueError, match=message):
            LossConfig(weights={"rollout_rkl": 1.0, "ce": 0.1}, **options)
    for clip in (0.5, math.nan):
        with pytest.raises(ValueError, match="rollout_clip"):
            LossConfig(weights={"rollout_rkl": 1.0}, rollout_clip=clip)
    # Without rollout_rkl, T != 1 is the divergences' business; with it, the targets are not read at all.
    LossConfig(weights={"forward_kl": 1.0}, temperature=2.0)
    LossConfig(weights={"rollout_rkl": 1.0}, targets="sampled")


def test_missing_records_are_named():
    hidden, head, batch = mixed_case(11)
    del batch["behaviour_logprob"]
    with pytest.raises(ValueError, match="rollout_rkl needs .* behaviour_logprob are missing .*teacher-cache generate"):
        distillation_loss(hidden, head, batch, LossConfig(weights={"rollout_rkl": 1.0}))


def _train_config(**options) -> TrainConfig:
    return TrainConfig(store="store", student="student", output="run", **options)


def test_train_config_passes_the_clip_and_refuses_what_the_loss_refuses():
    config = _train_config(loss=["rollout_rkl=0.5", "reverse_kl=0.5"], rollout_clip=3.0)
    assert config.loss_config("topk_tail").rollout_clip == 3.0
    assert config.loss_config("topk_tail").kd_weights == {"rollout_rkl": 0.5, "reverse_kl": 0.5}
    with pytest.raises(ValueError, match="temperature: 2.0 cannot be used with rollout_rkl"):
        _train_config(loss=["rollout_rkl=1"], temperature=2.0)
    with pytest.raises(ValueError, match="rollout_clip"):
        _train_config(loss=["rollout_rkl=1"], rollout_clip=0.9)
    with pytest.raises(ValueError, match="rollout_rkl cannot be used with online targets"):
        _train_config(loss=["rollout_rkl=1"], online_teacher="teacher")


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """A store of plain text: no `rollout` targets."""
    return make_small_store(tmp_path_factory.mktemp("rollout-store"), llama_dir, corpus_texts[:8])


def test_store_without_rollouts_is_refused_by_the_trainer(tmp_path, store, llama_dir):
    student = make_student_config(tmp_path / "student", llama_dir)
    args = ["--store", str(store), "--student", str(student), "--output", str(tmp_path / "run"), "--max-steps", "1",
            "--device", "cpu", "--eval-fraction", "0.5", "--batch-size", "1"]
    result = CliRunner().invoke(main, [*args, "--loss", "rollout_rkl=1"])
    assert result.exit_code == 2, result.output
    assert "holds no rollouts" in result.output and "teacher-cache build --dataset ROLLOUTS" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, [*args, "--loss", "rollout_rkl=1", "--rollout-clip", "0.5"])
    assert result.exit_code == 2 and "rollout_clip" in result.output
