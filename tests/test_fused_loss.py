"""The fused loss path (`student_train.fused_loss`) against the checkpointed one and against plain autograd.

The checkpointed chunks are the reference the fused path must reproduce: same loss, metrics and gradients with
respect to the hidden states, the head's weight and its bias, for every store representation and every divergence
`LossConfig` allows with it (found by asking LossConfig, so representations added later are covered), T in {1, 2}
where allowed, several chunk sizes, CE alone, no trained position, bf16/fp16 autocast. In float64 the fused path
stays in float64 after the head, so it is checked against autograd through `Logits` over all positions at once in
float64, and by finite differences (gradcheck). Last, real training steps of a tiny HF student with tied embeddings
through `student_train.train.train` end with the same parameters either way.

Legend: B batch, L positions per row, H hidden size, V vocabulary, K top-k, P trained positions.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store
from test_losses import BETA, SKEW, B, L, N, V, buckets, draw_counts, make_case, sampled_records
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from student_train.cli import main
from student_train.collate import TAIL_BUCKET
from student_train.config import TrainConfig
from student_train.divergences import DIVERGENCES, REPRESENTATIONS, TARGETS_FROM, Logits
from student_train.loss_config import CE, LossConfig, kd_scale
from student_train.losses import TEACHER_HIDDEN, _select_targets, distillation_loss
from student_train.train import train


def _allowed(representation: str, divergence: str, temperature: float, tail_bucket: bool) -> bool:
    try:
        LossConfig(weights={divergence: 1.0}, targets=representation, temperature=temperature,
                   sampled_tail_bucket=tail_bucket)
    except ValueError:
        return False
    return True


# (representation, divergence, temperature, tail bucket): every combination LossConfig accepts; the tail bucket is
# the vllm stores' variant of sampled targets.
CASES = [(r, d, t, bucket) for r in REPRESENTATIONS for bucket in ((False, True) if r == "sampled" else (False,))
         for d in DIVERGENCES for t in (1.0, 2.0) if _allowed(r, d, t, bucket)]
CASE_IDS = [f"{r}{'+bucket' if bucket else ''}-{d}-T{t:g}" for r, d, t, bucket in CASES]


def case(seed: int, *, tail_bucket: bool = False, dtype: torch.dtype = torch.float32, bias: bool = True, **options):
    """Hidden states, head and batch of `test_losses.make_case` in `dtype`; with `tail_bucket`, sampled draws over
    the top-k ids plus the tail bucket, as a vllm store's collate."""
    hidden, head, teacher, batch = make_case(seed, bias=bias, **options)
    if tail_bucket:
        gen = torch.Generator().manual_seed(seed)
        counts = draw_counts(buckets(teacher.exp(), batch["topk_ids"]).float(), N, gen)
        columns, counts = sampled_records(counts)
        ids = batch["topk_ids"]
        real = torch.cat([ids, torch.full_like(ids[..., :1], TAIL_BUCKET)], -1).gather(-1, columns)
        batch |= {"sampled_ids": torch.where(counts > 0, real, 0), "sampled_counts": counts}
    return hidden.detach().to(dtype).requires_grad_(True), head.to(dtype), batch


def config(weights: dict, targets: str = "topk_tail", **options) -> LossConfig:
    return LossConfig(weights=weights, targets=targets, jsd_beta=BETA, skew_alpha=SKEW, **options)


def run(hidden, head, batch, loss_config, step: int = 0):
    """(loss, metrics, gradients w.r.t. hidden states and every head parameter)."""
    loss, metrics = distillation_loss(hidden, head, batch, loss_config, step=step)
    return loss, metrics, torch.autograd.grad(loss, [hidden, *head.parameters()])


def assert_same(actual, expected, *, rtol: float, atol: float, grad_rtol: float, grad_atol: float):
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = actual, expected
    assert loss.dtype == ref_loss.dtype and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name], rtol=rtol, atol=atol, msg=name)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == ref.dtype
        torch.testing.assert_close(grad, ref, rtol=grad_rtol, atol=grad_atol)


FP32 = dict(rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-7)


@pytest.mark.parametrize("representation,divergence,temperature,tail_bucket", CASES, ids=CASE_IDS)
def test_fused_equals_checkpoint(representation, divergence, temperature, tail_bucket):
    hidden, head, batch = case(1, tail_bucket=tail_bucket, k=20 if tail_bucket else 6)
    weights = {divergence: 0.7, CE: 0.4}
    options = dict(temperature=temperature, sampled_tail_bucket=tail_bucket)
    expected = run(hidden, head, batch, config(weights, representation, impl="checkpoint", **options))
    assert float(expected[1][divergence]) > 1e-3  # not trivially zero
    for size in (1, 4, 10_000):
        fused = run(hidden, head, batch, config(weights, representation, chunk_positions=size, **options))
        assert_same(fused, expected, **FP32)


def autograd_reference(hidden_BLH, head, batch, loss_config: LossConfig, step: int = 0):
    """The loss, metrics and gradients by autograd through `Logits` over every trained position at once, in the dtype
    of the head (no chunks, no checkpointing, no fp32 cast)."""
    mask = batch["loss_mask"]
    logits = head(hidden_BLH[mask])
    true = batch["input_ids"][:, 1:][mask]
    ce = (logits.logsumexp(-1) - logits.gather(-1, true[:, None]).squeeze(-1)).sum()
    targets = _select_targets(batch, loss_config, mask, true)
    logp, logq = TARGETS_FROM[loss_config.targets](Logits(logits), targets, loss_config.temperature)
    names = list(loss_config.kd_weights)
    kd = torch.stack([DIVERGENCES[name](logp, logq, loss_config.parameter(name)).sum() for name in names])
    n = max(int(mask.sum()), 1)
    weights = kd.new_tensor(list(loss_config.kd_weights.values()))
    scale = kd_scale(loss_config.kd_schedule, step)
    loss = scale * loss_config.temperature**2 * (weights * kd / n).sum() + loss_config.weights.get(CE, 0.0) * ce / n
    metrics = {name: kd[i].detach() / n for i, name in enumerate(names)}
    metrics |= {"kd": (weights * kd / n).sum().detach() / weights.sum(), "ce": ce.detach() / n,
                "kd_scale": torch.tensor(scale), "tokens": mask.sum()}
    return loss, metrics, torch.autograd.grad(loss, [hidden_BLH, *head.parameters()])


@pytest.mark.parametrize("representation,divergence,temperature,tail_bucket", CASES, ids=CASE_IDS)
def test_fused_float64_equals_autograd(representation, divergence, temperature, tail_bucket):
    hidden, head, batch = case(2, tail_bucket=tail_bucket, dtype=torch.float64, k=20 if tail_bucket else 6)
    loss_config = config({divergence: 0.6, CE: 0.3}, representation, temperature=temperature, chunk_positions=3,
                         sampled_tail_bucket=tail_bucket, kd_schedule="linear_warmup:4")
    fused = run(hidden, head, batch, loss_config, step=1)
    assert fused[0].dtype == torch.float64
    assert_same(fused, autograd_reference(hidden, head, batch, loss_config, step=1), rtol=1e-12, atol=1e-14,
                grad_rtol=1e-10, grad_atol=1e-12)


@pytest.mark.parametrize("representation", ["topk_tail", "sampled"])
def test_tail_far_below_the_head_keeps_its_precision(representation):
    """The student puts exp(-120) (below the smallest fp32) on each id outside the targets' ids: its mass there (the
    tail bucket, the undrawn rest) and the gradients must still come out right in fp32, as autograd gives them in
    float64."""
    vocab, k = 50, 5
    gen = torch.Generator().manual_seed(13)
    ids = torch.randperm(vocab, generator=gen)[:k].sort().values.expand(B, L, k)
    logits = torch.full((B, L, vocab), -120.0).scatter(-1, ids, 0.0) + 0.1 * torch.randn(B, L, vocab, generator=gen)
    head = nn.Linear(vocab, vocab, bias=False)  # the identity: the hidden states are the logits
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    counts = torch.arange(1, k + 1, dtype=torch.float32).expand(B, L, k)
    batch = {"loss_mask": torch.ones(B, L, dtype=torch.bool), "input_ids": torch.randint(k, (B, L + 1), generator=gen),
             "topk_ids": ids, "topk_logprobs": torch.full((B, L, k), -2.0), "tail_logmass": torch.full((B, L), -3.0),
             "sampled_ids": ids, "sampled_counts": counts}
    loss_config = config({"forward_kl": 0.5, "jsd": 0.5, CE: 0.2}, representation, chunk_positions=4)
    fused = run(logits.clone().requires_grad_(True), head, batch, loss_config)
    expected = autograd_reference(logits.double().requires_grad_(True), copy.deepcopy(head).double(), batch,
                                  loss_config)
    if representation == "topk_tail":  # the tail term: teacher mass exp(-3), the student's about exp(-116)
        assert float(fused[1]["forward_kl"]) > 1.0
    assert_same([fused[0].double(), {k: v.double() for k, v in fused[1].items()}, [g.double() for g in fused[2]]],
                [expected[0], {k: v.double() for k, v in expected[1].items()}, expected[2]],
                rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-7)


@pytest.mark.parametrize("representation", list(REPRESENTATIONS))
def test_mixture_schedule_and_top_k(representation):
    """Every divergence the representation allows, with CE, at T = 2 where allowed, scheduled; top-k narrowed."""
    temperature = 2.0 if _allowed(representation, "forward_kl", 2.0, False) else 1.0
    names = [d for d in DIVERGENCES if _allowed(representation, d, temperature, False)]
    weights = {name: 0.1 * (i + 1) for i, name in enumerate(names)} | {CE: 0.25}
    top_k = {"top_k": 3} if representation in ("topk_tail", "topk_renorm") else {}
    hidden, head, batch = case(12)
    options = dict(temperature=temperature, kd_schedule="cosine_decay:10", **top_k)
    expected = run(hidden, head, batch, config(weights, representation, impl="checkpoint", **options), step=3)
    assert_same(run(hidden, head, batch, config(weights, representation, chunk_positions=5, **options), step=3),
                expected, **FP32)


@pytest.mark.parametrize("bias", [True, False])
def test_ce_alone_needs_no_targets(bias):
    hidden, head, batch = case(3, bias=bias)
    batch = {key: batch[key] for key in ("loss_mask", "input_ids")}
    expected = run(hidden, head, batch, LossConfig(weights={CE: 1.0}, impl="checkpoint"))
    for size in (2, 10_000):
        assert_same(run(hidden, head, batch, LossConfig(weights={CE: 1.0}, chunk_positions=size)), expected, **FP32)


def test_weights_of_zero_at_this_step_give_zero_gradients():
    """cosine_decay ends at 0: a KD-only loss is then 0, with gradients of 0 (and the KD metrics still reported)."""
    hidden, head, batch = case(4)
    loss_config = config({"forward_kl": 1.0}, kd_schedule="cosine_decay:2")
    fused = run(hidden, head, batch, loss_config, step=5)
    assert float(fused[0].detach()) == 0.0 and all((grad == 0).all() for grad in fused[2])
    assert_same(fused, run(hidden, head, batch, config({"forward_kl": 1.0}, kd_schedule="cosine_decay:2",
                                                       impl="checkpoint"), step=5), **FP32)


def test_no_trained_position_gives_zero_with_graph():
    hidden, head, batch = case(5)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    loss, metrics, grads = run(hidden, head, batch, config({"jsd": 0.5, "tv": 0.5, CE: 1.0}))
    assert loss.item() == 0.0 and int(metrics["tokens"]) == 0 and float(metrics["kd"]) == 0.0
    assert [g.shape for g in grads] == [hidden.shape, head.weight.shape, head.bias.shape]
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("representation", ["topk_tail", "sampled"])
def test_autocast_matches_checkpoint(dtype, representation):
    """Under autocast both paths apply the head in the autocast dtype and take fp32 after it; the products of
    backward are in the autocast dtype too, so the gradients agree to its precision."""
    hidden, head, batch = case(6)
    temperature = 2.0 if representation == "topk_tail" else 1.0
    weights = {"forward_kl": 0.5, "skew_rkl": 0.2, CE: 0.5}
    out = {}
    for impl in ("fused", "checkpoint"):
        with torch.autocast("cpu", dtype=dtype):
            out[impl] = run(hidden, head, batch, config(weights, representation, temperature=temperature,
                                                        chunk_positions=4, impl=impl))
    assert out["fused"][0].dtype == torch.float32
    assert [g.dtype for g in out["fused"][2]] == [torch.float32] * 3
    # The hidden states' gradients agree exactly; the head's, summed over chunks, are rounded differently: the
    # fused path accumulates them in fp32, the parameters' dtype.
    assert_same(out["fused"], out["checkpoint"], rtol=1e-5, atol=1e-6, grad_rtol=2e-2, grad_atol=1e-3)


def test_bfloat16_model_matches_checkpoint():
    """A bf16 head and bf16 hidden states, without autocast: the gradients come back in bf16."""
    hidden, head, batch = case(7, dtype=torch.bfloat16)
    weights = {"jsd": 0.5, CE: 0.5}
    fused = run(hidden, head, batch, config(weights, chunk_positions=4))
    assert [g.dtype for g in fused[2]] == [torch.bfloat16] * 3
    assert_same(fused, run(hidden, head, batch, config(weights, chunk_positions=4, impl="checkpoint")),
                rtol=1e-5, atol=1e-6, grad_rtol=2e-2, grad_atol=1e-3)


@pytest.mark.parametrize("representation,divergence,temperature,tail_bucket", [
    ("topk_tail", "jsd", 2.0, False), ("topk_renorm", "reverse_kl", 2.0, False), ("sampled", "skew_rkl", 1.0, True),
])
def test_gradcheck(representation, divergence, temperature, tail_bucket):
    """Finite differences in float64 on a tiny case agree with the gradients the fused path builds in forward."""
    _, _, batch = case(8, tail_bucket=tail_bucket, k=3, vocab=13, length=3)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(B, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True)
    loss_config = config({divergence: 0.8, CE: 0.3}, representation, temperature=temperature, chunk_positions=2,
                         sampled_tail_bucket=tail_bucket)

    def loss(hidden, weight, bias):  # the fused path reads the head's weight and bias only
        return distillation_loss(hidden, types.SimpleNamespace(weight=weight, bias=bias), batch, loss_config)[0]

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


def test_graph_keeps_the_gradients_not_the_logits():
    """Between forward and backward the fused loss holds dh [P, H], dW [V, H] and db [V], nothing of [C, V]."""
    hidden, head, batch = case(9)
    loss, _ = distillation_loss(hidden, head, batch, config({"forward_kl": 1.0, CE: 1.0}, chunk_positions=2))
    positions = int(batch["loss_mask"].sum())
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(positions, 16), (V, 16), (V,)]


def test_online_targets_stay_on_the_checkpointed_path():
    hidden, head, batch = case(10)
    teacher = nn.Linear(8, V)
    teacher.requires_grad_(False)
    batch[TEACHER_HIDDEN] = torch.randn(B, L, 8)
    loss_config = config({"forward_kl": 1.0, CE: 0.5}, "online", temperature=2.0)
    assert loss_config.impl == "fused"
    loss, metrics = distillation_loss(hidden, head, batch, loss_config, teacher_head=teacher)
    assert "FusedLoss" not in type(loss.grad_fn).__name__
    reference, ref_metrics = distillation_loss(hidden, head, batch, config({"forward_kl": 1.0, CE: 0.5}, "online",
                                                                          temperature=2.0, impl="checkpoint"),
                                               teacher_head=teacher)
    assert torch.equal(loss, reference) and torch.equal(metrics["kd"], ref_metrics["kd"])


def test_no_grad_gives_the_values_only():
    hidden, head, batch = case(11)
    loss_config = config({"tv": 1.0, CE: 0.5}, chunk_positions=3)
    with torch.no_grad():
        loss, metrics = distillation_loss(hidden, head, batch, loss_config)
    assert loss.grad_fn is None
    expected, ref_metrics = distillation_loss(hidden, head, batch, config({"tv": 1.0, CE: 0.5}, impl="checkpoint"))
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(metrics, ref_metrics)


# --- Options ----------------------------------------------------------------------------------------------------------


def test_impl_choices_are_checked():
    with pytest.raises(ValueError, match="impl: 'fast' is not one of fused, checkpoint"):
        LossConfig(impl="fast")
    with pytest.raises(ValueError, match="--loss-impl: 'fast' is not one of fused, checkpoint"):
        TrainConfig(store="s", student="m", output="o", loss_impl="fast")
    assert TrainConfig(store="s", student="m", output="o").loss_config("topk_tail").impl == "fused"


def test_cli_and_yaml_choose_the_impl(tmp_path, monkeypatch):
    import student_train.train

    seen = []
    monkeypatch.setattr(student_train.train, "train", lambda config: seen.append(config) or {})
    required = ["--store", "s", "--student", "t", "--output", str(tmp_path / "run")]
    result = CliRunner().invoke(main, [*required, "--loss-impl", "checkpoint"])
    assert result.exit_code == 0, result.output
    assert seen.pop().loss_impl == "checkpoint"
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("loss_impl: checkpoint\n")
    result = CliRunner().invoke(main, [*required, "--config", str(yaml_file)])
    assert result.exit_code == 0, result.output
    assert seen.pop().loss_impl == "checkpoint"
    result = CliRunner().invoke(main, [*required, "--loss-impl", "fast"])
    assert result.exit_code == 2 and "'fast' is not one of 'fused', 'checkpoint'" in result.output
    assert "--loss-impl" in CliRunner().invoke(main, ["--help"]).output and not seen


# --- Training -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("fused-store"), llama_dir, corpus_texts[:24])


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory, llama_dir) -> Path:
    """A config-only Llama student (random init) whose output head is its input embedding."""
    path = tmp_path_factory.mktemp("tied-student")
    LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("loss", [["forward_kl=0.7", "ce=0.3"], ["ce=1"]])
def test_training_with_tied_embeddings_matches_checkpoint(tmp_path, store, tied_student, loss):
    """A few real training steps (grad accumulation, clipping, AdamW, evaluation) of a student whose head is its
    embedding: the fused and checkpointed losses give the same metrics and the same parameters."""
    runs = {}
    for impl in ("fused", "checkpoint"):
        output = tmp_path / impl
        evaluation = train(TrainConfig(store=str(store), student=str(tied_student), output=str(output), loss=loss,
                                       temperature=2.0 if len(loss) > 1 else 1.0, batch_size=2, grad_accum=2,
                                       max_steps=4, lr=1e-3, eval_fraction=0.2, eval_every=2, chunk_positions=16,
                                       device="cpu", precision="fp32", seed=3, loss_impl=impl))
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        model = AutoModelForCausalLM.from_pretrained(output)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        runs[impl] = evaluation, [r for r in records if "eval" not in r], model.state_dict()
    (eval_a, train_a, state_a), (eval_b, train_b, state_b) = runs["fused"], runs["checkpoint"]
    for a, b in zip(train_a, train_b, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    for key in ("lm_loss", "kl", "top1_agreement"):
        assert eval_a[key] == pytest.approx(eval_b[key], rel=1e-5, abs=1e-7), key
    assert set(state_a) == set(state_b)
    for name, value in state_a.items():
        torch.testing.assert_close(state_b[name], value, rtol=1e-5, atol=1e-6, msg=name)
