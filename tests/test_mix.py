"""`student-train --mix STORE=WEIGHT`: a main store mixed with other stores at fixed shares of whole micro-batches.

The schedule is checked against a closed form (two sources) and against the largest-deficit rule in exact
fractions (three); the samples each store gives against a plain `StoreLoader` of that store; resume after a kill
against an uninterrupted run (bit-identical weights on CPU); the metrics' sources against the schedule; the refusals
through the CLI; and rollout_rkl over a mix of a rollout store and a plain store, whose batches add 0 to it.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, make_student_config, train_killed, write_manifest
from test_rollouts import _rows, write_generated
from test_rollouts import build as build_rollout_store
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.causal_lm import forward_inputs as plain_forward_inputs
from storage.identity import tokenizer_fingerprint
from student_train.cli import main
from student_train.config import TrainConfig, parse_mix
from student_train.config_file import resolve_options
from student_train.loader import LoaderConfig, StoreLoader
from student_train.loss_config import LossConfig
from student_train.losses import distillation_loss
from student_train.mixture_loader import MixSchedule, source_names
from student_train.train import Trainer, train

BATCH = 4


@pytest.fixture(scope="module")
def store_a(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("mix-a"), llama_dir, corpus_texts[:40])


@pytest.fixture(scope="module")
def store_b(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """Other texts, the same teacher; a smaller store, so that its epochs turn over within a test."""
    return make_small_store(tmp_path_factory.mktemp("mix-b"), llama_dir, corpus_texts[40:60])


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("mix-student"), llama_dir)


def _config(store: Path, student: Path, output: Path, mix: list[str], **overrides) -> TrainConfig:
    options = dict(store=str(store), student=str(student), output=str(output), mix=mix, batch_size=BATCH,
                   max_steps=8, lr=1e-2, eval_fraction=0.2, eval_every=4, save_every=4, log_every=1, device="cpu",
                   seed=3)
    return TrainConfig(**{**options, **overrides})


def _train_records(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval" not in r]


def _two_source_mixed(k: int, share: Fraction) -> bool:
    """Whether micro-batch k is of the mixed store, for a mix of one store at `share`: the mixed store has given
    ceil(k * share - 1/2) of the first k (k * share rounded, halves down), so it gives micro-batch k exactly when
    that count grows."""
    return math.ceil((k + 1) * share - Fraction(1, 2)) > math.ceil(k * share - Fraction(1, 2))


def _largest_deficit(shares: list[Fraction], n: int) -> list[int]:
    """The source of each of n micro-batches: the largest (k + 1) * share - taken so far, the first on ties."""
    taken, order = [0] * len(shares), []
    for k in range(n):
        deficits = [(k + 1) * share - count for share, count in zip(shares, taken, strict=True)]
        source = deficits.index(max(deficits))
        taken[source] += 1
        order.append(source)
    return order


# --- the schedule and the samples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [Fraction(1, 2), Fraction(3, 10), Fraction(2, 3), Fraction(1, 7)])
def test_two_sources_follow_the_closed_form(share):
    schedule = MixSchedule([1 - share, share])
    order = [schedule.next() for _ in range(500)]
    assert order == [int(_two_source_mixed(k, share)) for k in range(500)]
    for n in range(1, 501):
        assert abs(order[:n].count(1) - round(n * share)) <= 1


def test_three_sources_keep_their_shares_over_every_prefix():
    shares = [Fraction(1, 2), Fraction(3, 10), Fraction(1, 5)]
    schedule = MixSchedule(shares)
    order = [schedule.next() for _ in range(300)]
    assert order == _largest_deficit(shares, 300)
    for n in range(1, 301):
        for source, share in enumerate(shares):
            assert abs(order[:n].count(source) - round(n * share)) <= 1, (n, source)
    assert [order[:10].count(source) for source in range(3)] == [5, 3, 2]  # exact over each period of 10


def test_each_store_gives_its_own_order(tmp_path, store_a, store_b, student_config):
    """Over enough micro-batches that the mixed store turns over its epoch, each store's batches are those of a
    plain loader of that store (the main one without its held-out tail), in order, and the stores alternate as the
    schedule says."""
    trainer = Trainer(_config(store_a, student_config, tmp_path / "run", [f"{store_b}=0.3"]))
    mixed_batches = len(StoreLoader(LoaderConfig(store=str(store_b), batch_size=BATCH, seed=3)))
    n = math.ceil(2.5 * mixed_batches / 0.3)
    batches = list(itertools.islice(trainer._batches(), n))
    sources = [trainer.train_loader.source_of(batch).index for batch in batches]
    assert sources == [int(_two_source_mixed(k, Fraction(3, 10))) for k in range(n)]
    assert len(trainer.train_loader) == math.ceil(len(trainer.train_loader.loaders[0]) / Fraction(7, 10))
    plain = [StoreLoader(LoaderConfig(store=str(store_a), batch_size=BATCH, seed=3, exclude_fraction_from_end=0.2)),
             StoreLoader(LoaderConfig(store=str(store_b), batch_size=BATCH, seed=3))]
    for index, loader in enumerate(plain):
        got = [batch for source, batch in zip(sources, batches, strict=True) if source == index]
        expected = list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), len(got)))
        assert len(got) > (mixed_batches if index else 0)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_weights_names_and_config_files():
    assert parse_mix(["/c/a=0.3", "/c/b=1/5"]) == [("/c/a", Fraction(3, 10)), ("/c/b", Fraction(1, 5))]
    assert parse_mix(["s3://bucket/x=y=0.25"]) == [("s3://bucket/x=y", Fraction(1, 4))]
    assert source_names(["/m/store", "/a/store", "/b/store", "/c/answers"]) == ["main", "/a/store", "/b/store",
                                                                                   "answers"]
    assert source_names(["/m/store", "/x/main"]) == ["main", "/x/main"]
    assert TrainConfig(store="s", student="t", output="o", mix="/c/a=0.5").mix == ["/c/a=0.5"]


def test_a_config_file_gives_the_mix_as_a_mapping_or_a_list(tmp_path):
    for text in ("mix: {/c/a: 0.25, /c/b: 0.5}\n", "mix: [/c/a=0.25, /c/b=0.5]\n"):
        (tmp_path / "run.yaml").write_text("store: s\nstudent: t\noutput: o\n" + text)
        values, _ = resolve_options(str(tmp_path / "run.yaml"), [], {})
        assert TrainConfig(**values).mix == ["/c/a=0.25", "/c/b=0.5"]


# --- resume and metrics ------------------------------------------------------------------------------------------


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, store_a, store_b, student_config, monkeypatch):
    """Killed after the step-4 checkpoint and resumed, the run trains steps 5-8 on the micro-batches an uninterrupted
    run trains on: the same metrics, and bit for bit the same final weights. The checkpoint falls mid-period of the
    schedule (8 micro-batches of a period of 5), so the schedule's position must be restored, not only the stores'."""
    mix = [f"{store_b}=0.4"]
    train(_config(store_a, student_config, tmp_path / "full", mix, grad_accum=2))
    full = _train_records(tmp_path / "full")

    # Step 5 starts after the step-4 checkpoint.
    train_killed(monkeypatch, _config(store_a, student_config, tmp_path / "cut", mix, grad_accum=2), completed=5)
    train(_config(store_a, student_config, tmp_path / "cut", mix, grad_accum=2, resume=True))
    resumed = _train_records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
    for a, b in zip(full, resumed, strict=True):
        for key in ("loss", "kd", "ce", "tokens", "lr", "samples_from", "loss_from"):
            assert a[key] == b[key], (a["step"], key)
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name, value in final_a.items():
        assert torch.equal(final_b[name], value), name
    with pytest.raises(ValueError, match="changed: mix"):  # a run resumes with the mix it was trained with
        train(_config(store_a, student_config, tmp_path / "cut", [f"{store_b}=0.25"], grad_accum=2, resume=True))


def test_metrics_name_the_sources(tmp_path, store_a, store_b, student_config):
    """One micro-batch a step, a record a step: the step's store gave BATCH samples, the other none, and the step's
    loss is its store's. Two micro-batches a step, a record every 3 steps: the counts of the window's 6 micro-batches
    as the schedule gives them."""
    share = Fraction(1, 3)
    train(_config(store_a, student_config, tmp_path / "one", [f"{store_b}={float(share)!r}"], max_steps=6))
    for k, record in enumerate(_train_records(tmp_path / "one")):
        mixed = _two_source_mixed(k, share)
        assert record["samples_from"] == {"main": 0 if mixed else BATCH, "store": BATCH if mixed else 0}
        assert record["loss_from"]["store" if mixed else "main"] == pytest.approx(record["loss"], rel=1e-12)
        assert record["loss_from"]["main" if mixed else "store"] is None

    train(_config(store_a, student_config, tmp_path / "window", [f"{store_b}={float(share)!r}"], max_steps=6,
                  grad_accum=2, log_every=3, save_every=3))
    records = _train_records(tmp_path / "window")
    assert [r["step"] for r in records] == [3, 6]
    for window, record in enumerate(records):
        from_mixed = sum(_two_source_mixed(k, share) for k in range(6 * window, 6 * window + 6))
        assert record["samples_from"] == {"main": BATCH * (6 - from_mixed), "store": BATCH * from_mixed}


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_only(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """A store of sampled targets only: no top-k for topk_tail."""
    return make_small_store(tmp_path_factory.mktemp("mix-sampled"), llama_dir, corpus_texts[60:70],
                            targets=("sampled",))


@pytest.fixture(scope="module")
def short_samples(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("mix-short"), llama_dir, corpus_texts[60:70], seq_len=16)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, store_b) -> Path:
    """A copy of store_b whose manifest names another tokenizer (as a store of another teacher would)."""
    path = tmp_path_factory.mktemp("mix-other") / "store"
    shutil.copytree(store_b, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["teacher"]["tokenizer_sha256"] = "0" * 64
    write_manifest(path / "manifest.json", manifest)
    return path


def _refused(tmp_path, store_a, student_config, *args: str) -> str:
    result = CliRunner().invoke(main, ["--store", str(store_a), "--student", str(student_config), "--output",
                                       str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    return " ".join(result.output.split())


def test_refusals_through_the_cli(tmp_path, store_a, store_b, student_config, sampled_only, short_samples,
                                  other_tokenizer):
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{store_b}=0.6", "--mix", f"{sampled_only}=0.4")
    assert "sum to 1" in out and "--store no share" in out
    for weight in ("0", "-0.2", "1"):
        out = _refused(tmp_path, store_a, student_config, "--mix", f"{store_b}={weight}")
        assert f"--mix {store_b}={weight}" in out and "(0, 1)" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{store_b}=half")
    assert "expected STORE=WEIGHT" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{other_tokenizer}=0.5")
    assert f"--mix {other_tokenizer}" in out and "tokenizer" in out and "sha256 000000000000" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{short_samples}=0.5")
    assert f"--mix {short_samples}" in out and "16 tokens long" in out and "--seq-len 32" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{sampled_only}=0.5")
    assert f"--mix {sampled_only}" in out and "topk_tail" in out and "teacher-cache build" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{tmp_path / 'nowhere'}=0.5")
    assert f"--mix {tmp_path / 'nowhere'}" in out and "not a teacher-cache store" in out
    out = _refused(tmp_path, store_a, student_config, "--mix", f"{store_b}=0.5", "--loss", "rollout_rkl=1")
    assert "none of the stores" in out and str(store_b) in out and "teacher-cache build --dataset ROLLOUTS" in out


# --- rollout_rkl over a mix ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout_store(tmp_path_factory, llama_dir) -> Path:
    root = tmp_path_factory.mktemp("mix-rollouts")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    dataset = write_generated(root / "gen", _rows(tokenizer), tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    build_rollout_store(llama_dir, dataset, root / "rollouts", "--seq-len", "24")
    return root / "rollouts"


def test_rollout_rkl_trains_on_a_mix_and_a_plain_store_adds_nothing(tmp_path, rollout_store, llama_dir,
                                                                    corpus_texts, student_config, monkeypatch):
    (tmp_path / "plain").mkdir()
    plain = make_small_store(tmp_path / "plain", llama_dir, corpus_texts[60:72], seq_len=24)
    share = Fraction(1, 2)
    config = TrainConfig(store=str(rollout_store), student=str(student_config), output=str(tmp_path / "run"),
                         mix=[f"{plain}=0.5"], loss=["rollout_rkl=1", "ce=0.1"], eval_store=str(plain),
                         batch_size=2, max_steps=6, log_every=1, eval_every=6, save_every=6, device="cpu", lr=1e-3,
                         allow_chat_template_mismatch=True)
    trainer = Trainer(config)
    # Packed conversations are read document by document, packed plain text across documents, as each was built.
    assert [source.isolated for source in trainer.train_loader.sources] == [True, False]
    isolated = []

    def forward_inputs(input_ids, attention_mask, segment_ids):
        isolated.append(segment_ids is not None)
        return plain_forward_inputs(input_ids, attention_mask, segment_ids)

    monkeypatch.setattr("student_train.train.forward_inputs", forward_inputs)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.run()
    assert isolated[:6] == [not _two_source_mixed(k, share) for k in range(6)]  # then evaluation's
    records = _train_records(tmp_path / "run")
    assert len(records) == 6
    for k, record in enumerate(records):
        assert math.isfinite(record["loss"])
        if _two_source_mixed(k, share):  # the plain store: no drawn token, so no weight and no reverse KL
            assert record["rollout_weight"] == 0.0 and record["rollout_rkl"] == 0.0
            assert record["loss"] == pytest.approx(0.1 * record["ce"], rel=1e-6)
        else:
            assert record["rollout_weight"] > 0 and record["rollout_rkl"] != 0.0
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    assert any(not torch.equal(before[name], value) for name, value in after.items())


def test_a_batch_without_rollouts_adds_zero_only_in_a_mix():
    """A plain store's batch under rollout_rkl: with `rollouts_optional` (a store of a mix) its rollout_rkl and
    its gradient are 0; without (a run on that store alone) it is the missing-records error, as before."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16)
    hidden_BLH = torch.randn(2, 5, 8, requires_grad=True)
    batch = {"loss_mask": torch.ones(2, 5, dtype=torch.bool), "input_ids": torch.randint(0, 16, (2, 6)),
             "true_logprob": torch.full((2, 5), -1.0)}
    config = LossConfig(weights={"rollout_rkl": 1.0})
    loss, parts = distillation_loss(hidden_BLH, head, batch, config, rollouts_optional=True)
    assert float(parts["rollout_rkl"]) == 0.0 and float(parts["rollout_weight"]) == 0.0
    loss.backward()
    assert not hidden_BLH.grad.any()
    with pytest.raises(ValueError, match="behaviour_logprob are missing"):
        distillation_loss(hidden_BLH, head, batch, config)
