"""The pass over the vocabulary (`teacher_cache.targets.vocab_pass`), eager and through `torch.compile`: every value
`extract_targets` returns checked against a float64 brute force computed here from the same fp32 logits.

The logits are hand-made to reach each branch: -inf logits, fewer finite ids than k (no tail), ties everywhere and
ties across the top-k boundary (some tied ids kept, others left in the tail), a tail far below fp32's smallest
probability, large logits, and positions without a distribution (a NaN logit, a +inf logit, every logit -inf), which
must still come out with a non-finite entropy. Chunks, and the blocks extracted at once within them, are of uneven
size, down to a single position. The output head writes its logits into the buffer a batch reuses, soft cap
included.

A top-k is right when it is a top-k: any choice among ties is, so the check is that no id outside it has a larger
logit, and the tail is then the mass outside the ids actually chosen. Draws are checked by their distribution: ids
at probability 0 (or, for tail draws, in the top-k) are never drawn, systematic counts are floor or ceil of N p, and
over many positions each id's total count is within five binomial standard errors (+1) of its expectation.

Legend: P positions, V vocabulary, H hidden size, K top-k, N draws, R repeats of each row.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, write_jsonl
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from storage import open_store
from storage.causal_lm import CausalLM
from teacher_cache.cli import main
from teacher_cache.targets import TargetSpec, extract_targets, vocab_pass

V, K, N, R = 200, 8, 16, 300
INVALID = (8, 9, 10)  # rows of `hard_logits` without a distribution


def hard_logits() -> torch.Tensor:
    """[13, V] fp32 logits, one case per row (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(13, V, generator=g) * 3
    rows[1, ::3] = float("-inf")
    rows[2, 5:] = float("-inf")  # 5 ids with mass: the top-8 holds 3 of probability 0, no tail
    rows[3, K:] = float("-inf")  # exactly k ids with mass: no tail
    rows[4] = 0.0  # every id tied
    rows[5, :20] = 9.0  # 20 ids tied at the top: the top-8 keeps 8, the tail holds 12 at the same logit
    rows[6, :6] = torch.arange(20.0, 26.0)
    rows[6, 6:10] = 12.0  # 4 ids tied at the boundary: 2 in the top-8, 2 in the tail
    rows[7] = 0.0
    rows[7, 3] = 300.0  # tail mass (V - 1) e^-300, far below fp32's smallest probability
    rows[8, 17] = float("nan")
    rows[9, 4] = float("inf")
    rows[10] = float("-inf")
    rows[11] += 80.0
    return rows


def extract(logits_PV: torch.Tensor, *, compiled: bool, chunk: int = 5, block: int | None = 2, seed: int = 0,
            **targets) -> dict:
    """`extract_targets` of positions whose logits are exactly `logits_PV` (each hidden state is its row index),
    under inference mode as the backends run it. The default chunks of 5 and blocks of 2 cut 13 positions into
    blocks of 2, 2, 1, 2, 2, 1, 2, 1."""
    P = len(logits_PV)
    spec = TargetSpec(chunk_positions=chunk, block_positions=block, compiled=compiled,
                      **{"top_k": K, "num_draws": None} | targets)
    with torch.inference_mode():
        return extract_targets(torch.arange(P, dtype=torch.float32)[:, None], torch.arange(P) % V,
                               lambda h_p1: logits_PV[h_p1[:, 0].long()], spec, torch.Generator().manual_seed(seed))


def dense_counts(out: dict[str, torch.Tensor], P: int) -> torch.Tensor:
    """[P, V] float64 count of each id's draws."""
    row_E = torch.repeat_interleave(torch.arange(P), out["sampled_nunique"])
    return torch.zeros(P, V, dtype=torch.float64).index_put_(
        (row_E, out["sampled_ids"]), out["sampled_counts"].double(), accumulate=True)


def valid_rows(P: int) -> torch.Tensor:
    return torch.tensor([row % 13 not in INVALID for row in range(P)])


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request) -> bool:
    if request.param and vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile (dynamo with inductor) is not supported here: only the eager pass runs")
    return request.param


@pytest.mark.parametrize("draws", [{}, {"num_draws": N}, {"num_draws": N, "draws_from_tail": True}],
                         ids=["topk", "topk+sampled", "hybrid"])
def test_every_record_matches_a_float64_brute_force(compiled, draws):
    logits_PV = hard_logits()
    out = extract(logits_PV, compiled=compiled, **draws)
    valid = valid_rows(13)
    assert not out["entropy"][~valid].isfinite().any()  # flagged, as the backends refuse them
    logp_PV = logits_PV[valid].double().log_softmax(-1)
    plogp_PV = torch.where(logp_PV > float("-inf"), logp_PV.exp() * logp_PV, 0.0)
    torch.testing.assert_close(out["entropy"][valid].double(), -plogp_PV.sum(-1), rtol=1e-5, atol=2e-5)
    true_P = torch.arange(13)[valid]
    torch.testing.assert_close(out["true_logprob"][valid].double(), logp_PV[torch.arange(len(true_P)), true_P])

    ids_PK = out["topk_ids"][valid]
    assert (ids_PK.diff(dim=1) > 0).all()  # distinct, ascending
    kept_PV = torch.zeros_like(logp_PV, dtype=torch.bool).scatter_(1, ids_PK, True)
    lowest_kept = torch.where(kept_PV, logp_PV, float("inf")).amin(-1)
    assert (torch.where(kept_PV, float("-inf"), logp_PV).amax(-1) <= lowest_kept).all()  # a top-k, ties aside
    torch.testing.assert_close(out["topk_logprobs"][valid].double(), logp_PV.gather(1, ids_PK), rtol=0, atol=2e-5)
    tail_P = torch.where(kept_PV, float("-inf"), logp_PV).logsumexp(-1)
    torch.testing.assert_close(out["tail_logmass"][valid].double(), tail_P, rtol=1e-6, atol=2e-5)
    assert tail_P[7] < -290 and tail_P[2] == tail_P[3] == float("-inf")  # the cases are what they claim


@pytest.mark.parametrize("top_k", [K, None], ids=["with-topk", "alone"])
@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_draws_follow_the_full_distribution(compiled, scheme, top_k):
    logits_PV = hard_logits().repeat(R, 1)
    out = extract(logits_PV, compiled=compiled, chunk=1000, block=300, top_k=top_k, num_draws=N, draw_scheme=scheme)
    P = len(logits_PV)
    counts_PV, valid = dense_counts(out, P), valid_rows(P)
    assert not out["entropy"][~valid].isfinite().any()
    assert (counts_PV.sum(-1) == N).all()  # invalid positions draw from a stand-in, then the batch is refused
    p_PV = logits_PV[valid].double().softmax(-1)
    assert_distributed(counts_PV[valid], p_PV, scheme)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_tail_draws_follow_the_tail_outside_the_chosen_top_k(compiled, scheme):
    logits_PV = hard_logits().repeat(R, 1)
    out = extract(logits_PV, compiled=compiled, chunk=1000, block=300, num_draws=N, draws_from_tail=True,
                  draw_scheme=scheme)
    P = len(logits_PV)
    counts_PV, valid = dense_counts(out, P), valid_rows(P)
    tail_PV = logits_PV.double().softmax(-1).scatter(1, out["topk_ids"], 0.0)
    has_tail = valid & (tail_PV.sum(-1) > 0)
    assert (counts_PV.sum(-1) == torch.where(has_tail, N, 0)).all()  # no tail or no distribution: no entries
    assert (has_tail == out["tail_logmass"].isfinite()).all()
    # Conditioned on the tail: renormalised in log space, so the tiny tail of row 7 is a distribution like any other.
    tail_logp_PV = logits_PV.double().scatter(1, out["topk_ids"], float("-inf"))[has_tail].log_softmax(-1)
    assert_distributed(counts_PV[has_tail], tail_logp_PV.exp(), scheme)


def assert_distributed(counts_PV: torch.Tensor, p_PV: torch.Tensor, scheme: str) -> None:
    """No draw at p = 0; systematic counts floor or ceil of N p; every row case's total count per id within 5
    binomial standard errors (+1) of its expectation."""
    assert (counts_PV[p_PV == 0] == 0).all()
    if scheme == "systematic":
        assert ((counts_PV >= (N * p_PV - 1e-4).floor()) & (counts_PV <= (N * p_PV + 1e-4).ceil())).all()
    cases = len(counts_PV) // R  # the rows repeat with period `cases`
    counts_CV = counts_PV.view(R, cases, V).sum(0)
    expected_CV = N * p_PV.view(R, cases, V).sum(0)
    sd_CV = (N * (p_PV * (1 - p_PV)).view(R, cases, V).sum(0)).sqrt()
    assert ((counts_CV - expected_CV).abs() <= 5 * sd_CV + 1).all()


@pytest.mark.parametrize("targets", [{"top_k": None}, {"top_k": None, "num_draws": 4}, {"num_draws": 4},
                                     {"num_draws": 4, "draws_from_tail": True}],
                         ids=["entropy", "sampled", "topk+sampled", "hybrid"])
def test_compiled_and_eager_agree(targets):
    if vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile (dynamo with inductor) is not supported here: only the eager pass runs")
    logits_PV = torch.randn(37, 3000, generator=torch.Generator().manual_seed(1)) * 4
    fused, eager = (extract(logits_PV, compiled=compiled, chunk=16, block=None, **targets)
                    for compiled in (True, False))
    assert set(fused) == set(eager)
    for name, value in eager.items():
        if value.is_floating_point():
            torch.testing.assert_close(fused[name], value, rtol=1e-6, atol=1e-5)
        elif name == "topk_ids":
            assert torch.equal(fused[name], value)


# The pass of every variant, over blocks cut from `block_logits` in the given sizes, run in a fresh process.
FRESH_PROCESS = """
import sys, torch
sys.path[:0] = {paths!r}
from test_extraction_fused import pass_in_blocks, block_logits
torch.set_num_threads({threads})
for value in pass_in_blocks(block_logits(), {sizes!r}):
    sys.stdout.write(value.numpy().tobytes().hex() + "\\n")
"""


def in_fresh_process(script: str, tmp_path: Path, **fields) -> subprocess.CompletedProcess:
    """Run `script` (with `paths`, the tests' and the project's directories, and `fields` filled in) in a new Python
    process with an inductor cache of its own, so that it compiles its kernels afresh."""
    code = script.format(paths=[str(Path(__file__).parent), str(Path(__file__).parents[1])], **fields)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})


def block_logits() -> torch.Tensor:
    """[12, 3001] logits: V not a multiple of the draws' block, and a tie across a top-k boundary."""
    logits_PV = torch.randn(12, 3001, generator=torch.Generator().manual_seed(5)) * 4
    logits_PV[3, 100:120] = logits_PV[3].max()
    return logits_PV


def pass_in_blocks(logits_PV: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Every value of the compiled pass of each variant, over the blocks of `logits_PV` of the given sizes."""
    values = []
    for weights, top_k in ((None, None), (vocab_pass.FULL, None), (vocab_pass.FULL, K), (vocab_pass.TAIL, K)):
        parts = []
        for block_pV in logits_PV.split(list(sizes)):
            max_p1 = block_pV.amax(-1, keepdim=True)
            top_pK1 = top_ids_pK1 = None
            if top_k is not None:
                top_pK1, top_ids_pK1 = block_pV.topk(top_k + 1)
            parts.append(vocab_pass.run(block_pV, max_p1, top_pK1, top_ids_pK1, top_k, weights, compiled=True))
        values += [torch.cat([part[name] for part in parts]) for name in sorted(parts[0])]
    return values


def test_a_position_compiles_to_the_same_bits_whatever_its_block(tmp_path):
    """A resumed build, or one split across workers, cuts its positions into other blocks than a build made in one
    go, in another process: the compiled pass gives each position the same bits alone, in blocks of any length and
    in a fresh process that compiles from other shapes first and runs on another number of threads."""
    if vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile (dynamo with inductor) is not supported here: only the eager pass runs")
    logits_PV = block_logits()
    whole = pass_in_blocks(logits_PV, (12,))
    for sizes in ((1,) * 12, (2, 7, 1, 2), (5, 5, 2)):
        for value, expected in zip(pass_in_blocks(logits_PV, sizes), whole, strict=True):
            assert torch.equal(value.nan_to_num(), expected.nan_to_num()), sizes
    result = in_fresh_process(FRESH_PROCESS, tmp_path, threads=torch.get_num_threads(), sizes=(1, 3, 8))
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = result.stdout.split()
    assert fresh == [value.numpy().tobytes().hex() for value in whole]


# A process without a working C++ compiler: the compile fails, and inductor remembers the failed compiler for the
# rest of the process, hence a process of its own.
NO_COMPILER = """
import logging, sys, torch
import torch._inductor.config as inductor_config
sys.path[:0] = {paths!r}
from test_extraction_fused import N, extract, hard_logits
from teacher_cache.targets import vocab_pass
inductor_config.cpp.cxx = ("/nonexistent/c++",)
inductor_config.fx_graph_cache = False
logging.basicConfig(level=logging.WARNING)
logits_PV = hard_logits()
fallen = extract(logits_PV, compiled=True, num_draws=N)
assert vocab_pass.compiled_pass() is None, "the pass is still compiled"
eager = extract(logits_PV, compiled=False, num_draws=N)
for name, value in eager.items():
    assert torch.equal(fallen[name].nan_to_num(), value.nan_to_num()), name
print("fell back")
"""


def test_a_failed_compile_falls_back_to_the_eager_pass(tmp_path):
    """No working C++ compiler: the first compiled call fails, warns once, and the pass runs eagerly from there on,
    with the same records as an eager extraction."""
    if vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile is not supported here: there is nothing to fall back from")
    result = in_fresh_process(NO_COMPILER, tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["fell", "back"], result.stderr[-3000:]
    assert result.stderr.count("torch.compile failed, so the pass over the vocabulary runs eagerly") == 1


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_the_head_writes_its_logits_into_a_reused_buffer(tmp_path, architecture):
    """`CausalLM.logits` into a caller's buffer: the same logits as into a fresh one, including the soft cap of
    Gemma 2 applied in place (which the load's head check compares with the model's own logits)."""
    torch.manual_seed(0)
    shape = {"vocab_size": 500, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if architecture == "llama" else
             Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5)))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path)
    teacher = CausalLM(str(tmp_path), device="cpu", dtype="float32")
    hidden_PH = torch.randn(6, 32) * 4
    buffer_PV = torch.full((6, 500), float("nan"))
    with torch.inference_mode():
        written_PV = teacher.logits(hidden_PH, buffer_PV)
        fresh_PV = teacher.logits(hidden_PH)
    assert written_PV.data_ptr() == buffer_PV.data_ptr() and torch.equal(buffer_PV, fresh_PV)
    expected_PV = hidden_PH.double() @ teacher.head_weight_VH.double().T
    if architecture == "gemma2":
        expected_PV = torch.tanh(expected_PV / 0.5) * 0.5
        assert fresh_PV.abs().max() <= 0.5
    torch.testing.assert_close(fresh_PV.double(), expected_PV, rtol=1e-5, atol=1e-5)


def test_a_build_without_compilation_stores_the_same_targets(tmp_path, llama_dir, corpus_texts):
    """`--compile-extraction` (the default) fuses the pass: the same records as `--no-compile-extraction`'s eager
    pass, up to float rounding (the draws, made from weights that may differ in their last bit, are checked by the
    tests above)."""
    data = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:20])
    stores = []
    for options in (["--compile-extraction"], ["--no-compile-extraction"]):
        output = tmp_path / f"store{len(stores)}"
        result = CliRunner().invoke(main, [
            "build", "--model", str(llama_dir), "--dataset", str(data), "--output", str(output), "--seq-len", "32",
            "--batch-size", "4", "--max-samples", "6", "--top-k", str(K), "--samples", str(N), "--device", "cpu",
            "--dtype", "float32", "--chunk-positions", "50", *options])
        assert result.exit_code == 0, (result.output, result.exception)
        stores.append(open_store(output))
    for i in range(len(stores[0])):
        compiled, eager = stores[0][i], stores[1][i]
        assert (compiled["topk_ids"] == eager["topk_ids"]).all() and compiled["sampled_nunique"].sum() > 0
        # Stored top-k log-probs are multiples of 1/64: float noise at a rounding boundary moves one by a step.
        for name, atol in (("entropy", 1e-5), ("true_logprob", 1e-5), ("topk_logprobs", 1 / 64 + 1e-5),
                           ("tail_logmass", 1e-5)):
            torch.testing.assert_close(torch.from_numpy(compiled[name]), torch.from_numpy(eager[name]), rtol=1e-5,
                                       atol=atol)
