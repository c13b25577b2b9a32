"""`teacher-cache merge A B ... --output C`: concatenation and ensembles of finished stores.

Concatenation: two real stores of one tiny teacher over different texts become one store that equals reading A
then B, sample for sample (statistics included), passes `verify`, trains a student, and resumes after an
interruption; inputs of older versions come out in the current one; stores that differ are refused with every
difference named.
Ensembles: hand-made members (K = 3, overlapping, disjoint and identical top-k sets) give the hand-computed mixture;
two real teachers (different seeds) over the same texts give a valid distribution whose records are checked
against the teachers' full softmax; members with other samples or tokenizers are refused.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_llama, make_small_store, make_student_config, write_manifest
from transformers import AutoModelForCausalLM

from storage import StoreWriter, open_store
from storage.concat import concat_stores
from storage.ensemble import EnsembleConfig, ensemble_stores
from storage.layout import FORMAT_VERSION, quantize_logprobs
from storage.manifest import Manifest
from storage.targets import sample_stats
from student_train.config import TrainConfig
from student_train.loader import LoaderConfig, StoreLoader
from student_train.student import load_tokenizer
from student_train.train import train
from teacher_cache.cli import main


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def store_a(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("merge-a"), llama_dir, corpus_texts[:20])


@pytest.fixture(scope="module")
def store_b(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """Same teacher and options as A, other texts."""
    return make_small_store(tmp_path_factory.mktemp("merge-b"), llama_dir, corpus_texts[20:40])


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("teacher-seed-1"), seed=1)


@pytest.fixture(scope="module")
def store_c(tmp_path_factory, other_teacher, corpus_texts) -> Path:
    """Another teacher (same tokenizer) over A's texts."""
    return make_small_store(tmp_path_factory.mktemp("merge-c"), other_teacher, corpus_texts[:20])


@pytest.fixture(scope="module")
def concatenated(tmp_path_factory, store_a, store_b) -> Path:
    output = tmp_path_factory.mktemp("merge-ab") / "store"
    concat_stores([store_a, store_b], output)
    return output


def _assert_samples_equal(got: dict, want: dict, where) -> None:
    assert set(got) == set(want), where
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), (where, name)


def _edited_copy(store: Path, dest: Path, edit) -> Path:
    """A copy of `store` whose manifest `edit(dict)` changed, as if built so (the arrays stay those of `store`)."""
    shutil.copytree(store, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    write_manifest(dest / "manifest.json", manifest)
    return dest


def _without_sampled(manifest: dict) -> None:
    """A store built without sampled targets: neither the targets section nor the shards' entries name them."""
    manifest["targets"].pop("sampled")
    for shard in manifest["shards"]:
        shard["array_bytes"] = {k: v for k, v in shard["array_bytes"].items() if not k.startswith("sampled_")}
        shard["files"] = {k: v for k, v in shard["files"].items() if not k.startswith("sampled_")}


# --- concatenation -------------------------------------------------------------------------------------------------


def test_concatenation_equals_reading_each_store_in_turn(concatenated, store_a, store_b):
    out, a, b = open_store(concatenated), open_store(store_a), open_store(store_b)
    assert len(out) == len(a) + len(b) and len(out.shards) == len(a.shards) + len(b.shards)
    for i in range(len(out)):
        _assert_samples_equal(out[i], a[i] if i < len(a) else b[i - len(a)], i)
    want_stats = {name: np.concatenate([a.stats()[name], b.stats()[name]]) for name in a.stats()}
    _assert_samples_equal(out.stats(), want_stats, "stats")
    assert out.verify() == []

    manifest = out.manifest
    assert manifest.complete and manifest.format_version == FORMAT_VERSION
    assert manifest.teacher == a.manifest.teacher and manifest.targets == a.manifest.targets
    assert [(s["store"], s["first_sample"], s["samples"]) for s in manifest.dataset["sources"]] == [
        (str(store_a), 0, len(a)), (str(store_b), len(a), len(b))]
    assert [s.name for s in manifest.shards] == [f"shards/shard-{i:06d}" for i in range(len(out.shards))]
    attributes = [json.loads((concatenated / s.name / "zarr.json").read_text())["attributes"] for s in manifest.shards]
    assert [a["shard_index"] for a in attributes] == list(range(len(out.shards)))  # renumbered
    assert sorted(p.name for p in concatenated.iterdir()) == ["manifest.json", "shards"]


def test_concatenation_of_concatenations_keeps_one_list_of_sources(tmp_path, concatenated, store_a, store_b):
    manifest = concat_stores([concatenated, store_a], tmp_path / "aba")
    assert [(s["store"], s["first_sample"]) for s in manifest.dataset["sources"]] == [
        (str(store_a), 0), (str(store_b), 20), (str(store_a), 56)]


def test_student_trains_on_a_concatenation(tmp_path, concatenated, llama_dir):
    student = make_student_config(tmp_path / "student", llama_dir)
    config = TrainConfig(store=str(concatenated), student=str(student), output=str(tmp_path / "run"), batch_size=4,
                         max_steps=2, eval_fraction=0.2, eval_every=2, save_every=2, log_every=1, device="cpu")
    train(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("eval" not in json.loads(line) for line in lines) == 2


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m["targets"]["topk"].update(k=16), "targets.topk.k: "),
    (lambda m: m["build"].update(seq_len=64), "build.seq_len: "),
    (lambda m: m["teacher"].update(tokenizer_sha256="0" * 64), "teacher.tokenizer_sha256: "),
    (_without_sampled, "targets.sampled: "),
])
def test_concatenation_names_each_difference(tmp_path, store_a, edit, named):
    other = _edited_copy(store_a, tmp_path / "other", edit)
    with pytest.raises(ValueError, match="Cannot concatenate") as info:
        concat_stores([store_a, other], tmp_path / "out")
    assert named in str(info.value) and f"{store_a} has" in str(info.value) and f"{other} has" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_concatenation_refuses_another_teacher_unfinished_inputs_and_used_outputs(tmp_path, store_a, store_c):
    with pytest.raises(ValueError, match=r"(?s)teacher\.weights_sha256: .*--ensemble"):
        concat_stores([store_a, store_c], tmp_path / "out")
    unfinished = _edited_copy(store_a, tmp_path / "unfinished", lambda m: m.update(complete=False))
    with pytest.raises(ValueError, match=f"Cannot merge {unfinished}: .* is incomplete"):
        concat_stores([store_a, unfinished], tmp_path / "out")
    with pytest.raises(ValueError, match="not a teacher-cache store"):
        concat_stores([store_a, tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        concat_stores([store_a, store_a], tmp_path / "used")
    with pytest.raises(ValueError, match="is a store already"):
        concat_stores([store_a, store_a], store_a)
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_interrupted_concatenation_is_no_store_and_resumes(tmp_path, monkeypatch, concatenated, store_a, store_b):
    output = tmp_path / "store"
    original, done = StoreWriter.copy_shard, []

    def failing(self, index, source, info):
        result = original(self, index, source, info)
        done.append(index)
        if len(done) == 3:
            raise OSError("injected failure after a commit")
        return result

    with monkeypatch.context() as patch:
        patch.setattr(StoreWriter, "copy_shard", failing)
        with pytest.raises(OSError, match="injected"):
            concat_stores([store_a, store_b], output)
    assert not (output / "manifest.json").exists() and (output / "merging.json").exists()
    with pytest.raises(RuntimeError, match="unfinished `teacher-cache merge --output`.*--resume"):
        open_store(output)
    with pytest.raises(ValueError, match="interrupted merge .*--resume"):
        concat_stores([store_a, store_b], output)
    with pytest.raises(ValueError, match="other inputs or options"):
        concat_stores([store_b, store_a], output, resume=True)
    (output / "shards" / ".tmp-shard-000003-999").mkdir()  # a copy cut short

    copied = []
    monkeypatch.setattr(StoreWriter, "copy_shard", lambda self, index, *rest: copied.append(index)
                        or original(self, index, *rest))
    manifest = concat_stores([store_a, store_b], output, resume=True)
    assert copied == list(range(3, 8))
    reference = open_store(concatenated).manifest
    assert [(s.name, s.files) for s in manifest.shards] == [(s.name, s.files) for s in reference.shards]
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "shards"]
    assert sorted(p.name for p in (output / "shards").iterdir()) == [f"shard-{i:06d}" for i in range(8)]
    assert open_store(output).verify() == []


# --- hand-made stores ----------------------------------------------------------------------------------------------

VOCAB, SEQ_LEN, K, DRAWS = 10, 2, 3, 4
INPUT_IDS = [[1, 1, 5], [3, 2, 4]]
TEACHER = {"model": "/models/m", "backend": "transformers", "architecture": "LlamaForCausalLM",
           "config_sha256": "c", "weights_sha256": "w", "tokenizer_sha256": "t", "vocab_size": VOCAB,
           "tokenizer_vocab_size": VOCAB, "eos_token_id": 2, "pad_token_id": None, "dtype": "float32",
           "num_hidden_layers": 2, "hidden_size": 4}


def _hand_store(path: Path, positions: dict, *, teacher: dict | None = None, input_ids=INPUT_IDS,
                samples_per_shard: int = 1, format_version: int = FORMAT_VERSION, sampled: dict | None = None) -> Path:
    """A store of 2 samples x 2 positions; `positions` maps (sample, t) of the trained positions to
    (top-k ids, their probabilities, tail mass, entropy, true-token probability, {drawn id: count})."""
    S = len(input_ids)
    record = {
        "input_ids": np.asarray(input_ids, np.uint16), "attention_mask": np.ones((S, SEQ_LEN + 1), bool),
        "loss_mask": np.zeros((S, SEQ_LEN), bool), "segment_ids": np.zeros((S, SEQ_LEN + 1), np.uint16),
        "entropy": np.zeros((S, SEQ_LEN), np.float32), "true_logprob": np.zeros((S, SEQ_LEN), np.float32),
        "topk_ids": np.zeros((S, SEQ_LEN, K), np.uint16), "topk_logprobs": np.zeros((S, SEQ_LEN, K), np.float16),
        "tail_logmass": np.zeros((S, SEQ_LEN), np.float32), "sampled_nunique": np.zeros((S, SEQ_LEN), np.uint8),
    }
    ids, counts, rows = [], [], []
    for (s, t), (top, probs, tail, entropy, true_p, draws) in sorted(positions.items()):
        record["loss_mask"][s, t] = True
        record["topk_ids"][s, t], record["topk_logprobs"][s, t] = top, np.log(probs)
        record["tail_logmass"][s, t], record["entropy"][s, t], record["true_logprob"][s, t] = (
            math.log(tail), entropy, math.log(true_p))
        record["sampled_nunique"][s, t] = len(draws)
        ids += sorted(draws)
        counts += [draws[i] for i in sorted(draws)]
        rows.append(s)
    record["sampled_ids"], record["sampled_counts"] = np.asarray(ids, np.uint16), np.asarray(counts, np.uint8)
    targets = {"entropy": {"exact": True}, "true_logprob": {},
               "topk": {"k": K, "logprob_step": 1 / 64, "order": "ascending id", "tail": "tail_logmass"},
               "sampled": {"num_draws": DRAWS, "temperature": 1.0, "seed": 0, "source": "full distribution",
                           "replacement": True, **(sampled or {})}}
    manifest = Manifest(teacher={**TEACHER, **(teacher or {})}, dataset={"source": "hand", "split": "train",
                        "text_field": "text", "fingerprint": None},
                        build={"seq_len": SEQ_LEN, "pack": True, "max_samples": None, "batch_size": 1,
                               "samples_per_shard": samples_per_shard, "seed": 0},
                        targets=targets, format_version=format_version)
    writer = StoreWriter.open(path, manifest, resume=False)
    for index, start in enumerate(range(0, S, samples_per_shard)):
        stop = start + samples_per_shard
        entries = slice(int(record["sampled_nunique"][:start].sum()), int(record["sampled_nunique"][:stop].sum()))
        writer.write_shard(index, {name: value[entries] if name in ("sampled_ids", "sampled_counts")
                                   else value[start:stop] for name, value in record.items()})
    writer.finish()
    return path


# Member 1 and member 2 at the trained positions (0, 0): overlapping top-k; (0, 1): disjoint; (1, 0): identical.
# (1, 1) is not trained. Tuples: top-k ids, probabilities, tail, entropy, true-token probability, draws.
MEMBER_1 = {(0, 0): ([1, 3, 5], [0.5, 0.2, 0.1], 0.2, 1.0, 0.5, {1: 3, 3: 1}),
            (0, 1): ([0, 1, 2], [0.6, 0.2, 0.1], 0.1, 1.5, 0.6, {0: 4}),
            (1, 0): ([2, 4, 6], [0.5, 0.25, 0.125], 0.125, 1.2, 0.25, {2: 2, 4: 2})}
MEMBER_2 = {(0, 0): ([3, 5, 7], [0.4, 0.3, 0.1], 0.2, 2.0, 0.1, {3: 2, 7: 2}),
            (0, 1): ([7, 8, 9], [0.7, 0.1, 0.05], 0.15, 0.9, 0.05, {8: 1, 9: 3}),
            (1, 0): ([2, 4, 6], [0.5, 0.25, 0.125], 0.125, 1.2, 0.25, {2: 4})}


def _p(member: dict, position, id_: int) -> float:
    """A member's stored probability of an id (its log-prob in steps of 1/64 nat, exponentiated); 0 outside its
    top-k."""
    top, probs = member[position][:2]
    return float(np.exp(np.round(np.log(probs[top.index(id_)]) * 64) / 64)) if id_ in top else 0.0


def _tail(member: dict, position) -> float:
    """A member's stored tail mass (its log in steps of 1/64 nat, exponentiated)."""
    return float(np.exp(np.round(np.log(member[position][2]) * 64) / 64))


# The ensemble's own log-probs are stored in steps of 1/64 nat too: each within 1/128 nat (FORMAT.md).
STEP = math.expm1(1 / 128) + 1e-9


def _read(path: Path) -> dict:
    store = open_store(path)
    return store.read_rows(0, len(store))


@pytest.fixture
def members(tmp_path) -> tuple[Path, Path]:
    # Member 2 keeps both samples in one shard: the ensemble reads across the members' shard boundaries.
    return (_hand_store(tmp_path / "m1", MEMBER_1),
            _hand_store(tmp_path / "m2", MEMBER_2, teacher={"model": "/models/n", "weights_sha256": "v"},
                        samples_per_shard=2))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0)])
def test_ensemble_equals_the_hand_computed_mixture(tmp_path, members, weights):
    w1, w2 = weights[0] / sum(weights), weights[1] / sum(weights)
    manifest = ensemble_stores(EnsembleConfig(inputs=tuple(map(str, members)), output=str(tmp_path / "out"),
                                              weights=weights))
    got = _read(tmp_path / "out")
    assert open_store(tmp_path / "out").verify() == []

    def mixed(position, id_):
        return w1 * _p(MEMBER_1, position, id_) + w2 * _p(MEMBER_2, position, id_)

    # The 3 most probable of the union, ascending; the rest of the union joins the members' weighted tails.
    want = {(0, 0): ([1, 3, 5], [7]), (0, 1): ([0, 1, 7], [2, 8, 9]), (1, 0): ([2, 4, 6], [])}
    for position, (kept, dropped) in want.items():
        assert got["topk_ids"][position].tolist() == kept, position
        np.testing.assert_allclose(np.exp(got["topk_logprobs"][position].astype(np.float64)),
                                   [mixed(position, i) for i in kept], rtol=STEP)
        tail = (w1 * _tail(MEMBER_1, position) + w2 * _tail(MEMBER_2, position)
                + sum(mixed(position, i) for i in dropped))
        assert math.exp(got["tail_logmass"][position]) == pytest.approx(tail, rel=STEP)
        true_p = w1 * MEMBER_1[position][4] + w2 * MEMBER_2[position][4]
        assert got["true_logprob"][position] == pytest.approx(math.log(true_p), rel=1e-6)
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "entropy", "true_logprob", "sampled_nunique"):
        assert not got[name][1, 1].any(), name  # untrained: zero

    # Entropy: sum_j w_j H_j plus the information of the ids in both top-k (cells 3, 5 and the rest at (0, 0); only
    # the rest at (0, 1), which carries none); the identical position gets the members' entropy exactly.
    def info(cells):
        def term(p1, p2):
            q = w1 * p1 + w2 * p2
            return sum(w * p * math.log(p) for w, p in ((w1, p1), (w2, p2)) if p > 0) - q * math.log(q)
        rest1 = 1 - sum(p1 for p1, _ in cells)
        rest2 = 1 - sum(p2 for _, p2 in cells)
        return sum(term(p1, p2) for p1, p2 in cells) + term(rest1, rest2)

    shared = [(_p(MEMBER_1, (0, 0), i), _p(MEMBER_2, (0, 0), i)) for i in (3, 5)]
    assert got["entropy"][0, 0] == pytest.approx(w1 * 1.0 + w2 * 2.0 + info(shared), abs=2e-3)
    assert got["entropy"][0, 1] == pytest.approx(w1 * 1.5 + w2 * 0.9, rel=1e-6)
    assert got["entropy"][1, 0] == pytest.approx(1.2, rel=1e-6)
    assert manifest.targets["entropy"]["exact"] is False

    # Draws: equal weights pool all 4 + 4; 3 : 1 keeps 3 of member 1's and 1 of member 2's (N = 4).
    nunique, ids, counts = got["sampled_nunique"], got["sampled_ids"], got["sampled_counts"]
    starts = np.cumsum([0, *nunique.ravel().tolist()])
    drawn = {position: dict(zip(ids[starts[i]:starts[i + 1]].tolist(), counts[starts[i]:starts[i + 1]].tolist(),
                                strict=True))
             for i, position in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])}
    if w1 == w2:
        assert manifest.targets["sampled"]["num_draws"] == 8
        assert drawn == {(0, 0): {1: 3, 3: 3, 7: 2}, (0, 1): {0: 4, 8: 1, 9: 3}, (1, 0): {2: 6, 4: 2}, (1, 1): {}}
    else:
        assert manifest.targets["sampled"]["num_draws"] == 4 and manifest.targets["sampled"]["member_draws"] == [3, 1]
        for position in MEMBER_1:
            assert sum(drawn[position].values()) == 4
            assert set(drawn[position]) <= set(MEMBER_1[position][5]) | set(MEMBER_2[position][5])
        assert drawn[(0, 1)][0] == 3  # member 1 drew only id 0 there
    teacher = manifest.teacher
    assert [(m["model"], m["weight"]) for m in teacher["members"]] == [("/models/m", w1), ("/models/n", w2)]
    assert teacher["tokenizer_sha256"] == "t" and teacher["vocab_size"] == VOCAB and teacher["backend"] == "ensemble"


def test_ensemble_top_k_option_moves_the_rest_to_the_tail(tmp_path, members):
    ensemble_stores(EnsembleConfig(inputs=tuple(map(str, members)), output=str(tmp_path / "out"), top_k=2))
    got = _read(tmp_path / "out")
    assert got["topk_ids"][0, 0].tolist() == [1, 3]  # 0.25 and 0.3; 5 (0.2) and 7 (0.05) go to the tail
    assert math.exp(got["tail_logmass"][0, 0]) == pytest.approx(
        0.5 * (_tail(MEMBER_1, (0, 0)) + _tail(MEMBER_2, (0, 0)))
        + 0.5 * (_p(MEMBER_1, (0, 0), 5) + _p(MEMBER_2, (0, 0), 5) + _p(MEMBER_2, (0, 0), 7)), rel=STEP)
    with pytest.raises(ValueError, match="--top-k 4 exceeds the largest k of the stores"):
        ensemble_stores(EnsembleConfig(inputs=tuple(map(str, members)), output=str(tmp_path / "o2"), top_k=4))


def test_ensemble_drops_what_cannot_be_mixed(tmp_path, members, caplog):
    bucket = _hand_store(tmp_path / "bucket", MEMBER_2, teacher={"backend": "vllm"},
                         sampled={"source": "top-k + tail bucket", "tail_bucket_id": VOCAB})
    with caplog.at_level(logging.WARNING):
        manifest = ensemble_stores(EnsembleConfig(inputs=(str(members[0]), str(bucket)), output=str(tmp_path / "o")))
    assert "sampled" not in manifest.targets and "topk" in manifest.targets
    assert "sampled targets dropped" in caplog.text and "tail bucket" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        manifest = ensemble_stores(EnsembleConfig(inputs=tuple(map(str, members)), output=str(tmp_path / "o2"),
                                                  weights=(0.123, 0.877)))
    assert "sampled" not in manifest.targets and "whole numbers" in caplog.text


def test_ensemble_drops_draws_from_the_tail_and_keeps_the_top_k(tmp_path, members, caplog):
    """Hybrid members' draws come from the tail outside their own top-k: no draws of the mixture."""
    hybrid = _hand_store(tmp_path / "hybrid", MEMBER_2, teacher={"model": "/models/n", "weights_sha256": "v"},
                         sampled={"source": "tail", "draws_from": "tail"})
    with caplog.at_level(logging.WARNING):
        manifest = ensemble_stores(EnsembleConfig(inputs=(str(members[0]), str(hybrid)), output=str(tmp_path / "o")))
    assert "sampled" not in manifest.targets and manifest.targets["topk"]["k"] == K
    assert f"sampled targets dropped: the draws of {hybrid} come from the tail" in caplog.text
    assert "sampled_ids" not in open_store(tmp_path / "o")[0]
    with_members = ensemble_stores(EnsembleConfig(inputs=tuple(map(str, members)), output=str(tmp_path / "o2")))
    assert _read(tmp_path / "o")["topk_ids"].tolist() == _read(tmp_path / "o2")["topk_ids"].tolist()
    assert "sampled" in with_members.targets


def test_ensemble_refuses_other_samples_and_tokenizers(tmp_path, members):
    changed = [INPUT_IDS[0], [3, 2, 7]]
    other_ids = _hand_store(tmp_path / "ids", MEMBER_2, input_ids=changed)
    with pytest.raises(ValueError, match="sample 1 has other input_ids"):
        ensemble_stores(EnsembleConfig(inputs=(str(members[0]), str(other_ids)), output=str(tmp_path / "o")))
    shifted = {(s, 1 - t): value for (s, t), value in MEMBER_2.items()}
    other_mask = _hand_store(tmp_path / "mask", shifted)
    with pytest.raises(ValueError, match="sample 1 has other loss_mask"):
        ensemble_stores(EnsembleConfig(inputs=(str(members[0]), str(other_mask)), output=str(tmp_path / "o")))
    other_tokenizer = _hand_store(tmp_path / "tok", MEMBER_2, teacher={"tokenizer_sha256": "u"})
    with pytest.raises(ValueError, match="teacher.tokenizer_sha256: .* has 't', .* has 'u'"):
        ensemble_stores(EnsembleConfig(inputs=(str(members[0]), str(other_tokenizer)), output=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--weights: 3 weights for 2 stores"):
        EnsembleConfig(inputs=tuple(map(str, members)), output="o", weights=(1, 1, 1))
    with pytest.raises(ValueError, match="--weights: expected positive weights"):
        EnsembleConfig(inputs=tuple(map(str, members)), output="o", weights=(1, 0))
    assert not (tmp_path / "o").exists()


def test_ensembles_of_the_same_teachers_concatenate(tmp_path, members):
    """Member stores elsewhere (another dataset, in practice) make the same teacher; other weights make another."""
    again = [shutil.copytree(m, tmp_path / f"again-{i}") for i, m in enumerate(members)]
    for name, inputs, weights in (("e1", members, None), ("e2", again, None), ("e3", members, (3.0, 1.0))):
        ensemble_stores(EnsembleConfig(inputs=tuple(map(str, inputs)), output=str(tmp_path / name), weights=weights))
    manifest = concat_stores([tmp_path / "e1", tmp_path / "e2"], tmp_path / "out")
    assert manifest.num_samples == 4 and manifest.teacher["backend"] == "ensemble"
    with pytest.raises(ValueError, match="teacher.weights_sha256"):
        concat_stores([tmp_path / "e1", tmp_path / "e3"], tmp_path / "out2")


def test_concatenation_of_version_1_and_2_stores_is_of_the_current_version(tmp_path):
    """Version 1 and 2 inputs are decoded and written again in the current layout (version 3 splits the top-k
    log-probs into a floor and excesses), version 1 with the statistics it lacks."""
    v1 = _hand_store(tmp_path / "v1", MEMBER_1, format_version=1)
    v2 = _hand_store(tmp_path / "v2", MEMBER_2, format_version=2)
    concat_stores([v1, v2], tmp_path / "out")
    out = open_store(tmp_path / "out")
    assert out.manifest.format_version == FORMAT_VERSION and out.verify() == []
    assert len(list((tmp_path / "out").rglob("stats_num_tokens"))) == 4
    assert len(list((tmp_path / "out").rglob("topk_logprob_excess"))) == 4
    def as_version_2(record: dict) -> dict:  # version 1 log-probs are fp16; version 2 steps of 1/64 nat
        return {name: quantize_logprobs(value) if name in ("topk_logprobs", "tail_logmass") else value
                for name, value in record.items()}

    for i in range(4):
        source = open_store(v1 if i < 2 else v2)
        _assert_samples_equal(out[i], as_version_2(source[i % 2]), i)
    want = {name: np.concatenate([sample_stats(as_version_2(_read(path)), out.manifest.targets)[name]
                                  for path in (v1, v2)])
            for name in out.stats()}
    _assert_samples_equal(out.stats(), want, "stats")


# --- real teachers -------------------------------------------------------------------------------------------------


def test_ensemble_of_two_real_teachers_is_a_distribution_below_the_true_mixture(tmp_path, store_a, store_c,
                                                                                llama_dir, other_teacher):
    weights = (0.75, 0.25)
    output = tmp_path / "ensemble"
    result = _cli("merge", store_a, store_c, "--output", output, "--ensemble", "--weights", "3,1")
    assert result.exit_code == 0, result.output
    assert "an ensemble of 2 teachers" in result.output and "topk, sampled" in result.output
    store = open_store(output)
    assert store.verify() == [] and len(store) == len(open_store(store_a))
    got = store.read_rows(0, len(store))
    mask = got["loss_mask"]
    probs = np.exp(got["topk_logprobs"].astype(np.float64))
    total = probs.sum(-1) + np.exp(got["tail_logmass"].astype(np.float64))
    np.testing.assert_allclose(total[mask], 1.0, atol=math.expm1(2 / 128))  # members' rounding, then the ensemble's
    assert (np.diff(got["topk_ids"].astype(np.int64), axis=-1) > 0)[mask].all()
    assert (got["sampled_nunique"][mask] > 0).all()

    # Brute force: the teachers' full softmax over the stored tokens, mixed 3 : 1.
    ids = torch.from_numpy(got["input_ids"].astype(np.int64))
    attention = torch.from_numpy(got["attention_mask"][:, :-1]).long()
    mixture = 0.0
    for teacher, weight in zip((llama_dir, other_teacher), weights, strict=True):
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        with torch.no_grad():
            mixture = mixture + weight * model(input_ids=ids[:, :-1], attention_mask=attention).logits.softmax(-1)
    q = mixture.double().numpy()[mask]  # [P, V]
    true_q = np.take_along_axis(q, got["input_ids"][:, 1:][mask].astype(np.int64)[:, None], 1)[:, 0]
    np.testing.assert_allclose(got["true_logprob"][mask], np.log(true_q), atol=1e-4)
    # The union's mixture is a lower bound of the true one, up to the rounding of stored log-probs: the members'
    # and the ensemble's, 1/128 nat each; and up to the float32 noise of this forward, which recomputes the builds'
    # log-probs with other kernels (measured up to 7e-6 nat on the tiny teachers; 1e-4 allowed).
    log_q_top = np.log(np.take_along_axis(q, got["topk_ids"][mask].astype(np.int64), 1))
    assert (got["topk_logprobs"][mask] <= log_q_top + 2 / 128 + 1e-4).all()
    entropy = -(q * np.log(np.maximum(q, 1e-300))).sum(1)
    assert (got["entropy"][mask] <= entropy + 1e-4).all()
    member_entropy = sum(w * open_store(s).read_rows(0, len(store), ["entropy"])["entropy"][mask]
                         for s, w in zip((store_a, store_c), weights, strict=True))
    assert (got["entropy"][mask] >= member_entropy - 1e-5).all()

    batch = next(iter(StoreLoader(LoaderConfig(store=str(output), batch_size=4, shuffle=False))))
    # 3 : 1 of 16 draws each: 15 of the first teacher's and 5 of the second's at every position.
    assert store.manifest.targets["sampled"]["member_draws"] == [15, 5]
    assert batch["topk_ids"].shape[-1] == 8 and batch["sampled_counts"].sum(-1)[batch["loss_mask"]].eq(20).all()
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    assert load_tokenizer(student_dir, store.manifest).vocab_size == 32000  # a member's tokenizer


def test_ensemble_refuses_stores_of_other_texts(tmp_path, store_a, store_b, store_c):
    with pytest.raises(ValueError, match=r"samples: .* has 20, .* has 36"):
        ensemble_stores(EnsembleConfig(inputs=(str(store_a), str(store_b)), output=str(tmp_path / "o")))


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_concatenates_and_names_usage_errors(tmp_path, store_a, store_b, store_c):
    result = _cli("merge", store_a, store_b, "--output", tmp_path / "ab")
    assert result.exit_code == 0, result.output
    assert "Wrote 56 samples" in result.output and "2 stores concatenated" in result.output

    result = _cli("merge", store_a, store_c, "--output", tmp_path / "ac")
    assert result.exit_code == 2 and "teacher.weights_sha256" in result.output
    for args, message in [
        ((store_a, store_b), "2 stores need --output"),
        ((store_a, "--ensemble"), "--ensemble need --output"),
        ((store_a, store_b, "--output", tmp_path / "o", "--weights", "1,2"), "add --ensemble"),
        ((store_a, store_c, "--output", tmp_path / "o", "--ensemble", "--weights", "a,b"), "--weights: expected"),
        ((store_a, "--output", tmp_path / "o"), "at least 2 stores"),
    ]:
        result = _cli("merge", *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "o").exists()
