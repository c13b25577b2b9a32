"""`teacher-cache select` on a hand-made store whose per-sample statistics are known, and end to end with
`student-train --selection`.

The hand-made store is written with `StoreWriter` from records built here: every trained position of a sample
holds the same entropy and true-token log-prob, so each sample's means are known exactly, and the true token is
the teacher's top-1 at a chosen number of positions. The expected ids are written out by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_small_store, make_student_config

import student_train.train
from storage import StoreWriter
from storage.manifest import Manifest
from storage.reader import open_store
from storage.selection import SelectConfig, select_samples
from student_train.cli import main as student_main
from student_train.loader import LoaderConfig, StoreLoader
from teacher_cache.cli import main

L = 4
# Per sample: mean entropy, trained positions, mean NLL, positions whose true token is the top-1, tail mass.
# Sample 5 has no trained positions; 1, 3 and 11 tie on entropy; 12 and 17 have few tokens.
ENTROPY = [0.9, 0.3, 1.5, 0.3, 2.0, 1.0, 0.7, 1.1, 0.5, 1.8, 1.2, 0.3, 0.8, 1.6, 0.4, 1.9, 0.6, 1.3, 1.4, 1.7]
TOKENS = [4, 4, 4, 4, 4, 0, 4, 4, 4, 4, 4, 4, 1, 4, 4, 4, 4, 2, 4, 4]
NLL = [3.0, 1.0, 2.5, 4.0, 0.5, 9.0, 1.5, 3.5, 2.0, 0.2, 5.0, 0.1, 4.5, 0.3, 6.0, 0.4, 7.0, 0.6, 8.0, 0.7]
TOP1 = [4, 0, 2, 1, 3, 0, 2, 4, 1, 0, 3, 2, 1, 4, 0, 2, 1, 1, 3, 2]
TAIL = [0.01, 0.5, 0.02, 0.4, 0.03, 0.9, 0.3, 0.04, 0.2, 0.05, 0.1, 0.06, 0.08, 0.07, 0.15, 0.25, 0.35, 0.45, 0.6, 0.7]
# The candidates (all but sample 5) ranked by (entropy, id), as the module docstring of storage.selection says.
BY_ENTROPY = [1, 3, 11, 14, 8, 16, 6, 12, 0, 7, 10, 17, 18, 2, 13, 19, 9, 15, 4]


def _record(samples: range) -> dict[str, np.ndarray]:
    """Top-k ids (10, 20) with 10 the top-1; the true token is 10 at TOP1[i] trained positions, else 20 or 30."""
    n = len(samples)
    loss_mask = np.array([[t < TOKENS[i] for t in range(L)] for i in samples])
    true = np.array([[10 if t < TOP1[i] else (20 if t % 2 else 30) for t in range(L)] for i in samples])

    def per_sample(values: list[float]) -> np.ndarray:
        return np.repeat(np.asarray([values[i] for i in samples], np.float32)[:, None], L, axis=1)

    return {
        "input_ids": np.concatenate([np.ones((n, 1), np.uint16), true.astype(np.uint16)], axis=1),
        "attention_mask": np.ones((n, L + 1), bool),
        "loss_mask": loss_mask,
        "segment_ids": np.zeros((n, L + 1), np.uint16),
        "entropy": per_sample(ENTROPY) * loss_mask,
        "true_logprob": -per_sample(NLL) * loss_mask,
        "topk_ids": np.tile(np.array([10, 20], np.uint16), (n, L, 1)),
        "topk_logprobs": np.tile(np.array([-0.5, -1.5], np.float32), (n, L, 1)),
        "tail_logmass": np.log(per_sample(TAIL)),
    }


def _write_store(path: Path, version: int = 2, targets: dict | None = None) -> Path:
    manifest = Manifest(teacher={"vocab_size": 100}, dataset={}, build={"seq_len": L},
                        targets=targets or {"topk": {"k": 2}}, format_version=version)
    writer = StoreWriter.open(path, manifest, resume=False)
    for index, samples in enumerate([range(0, 7), range(7, 14), range(14, 20)]):
        record = _record(samples)
        if "topk" not in manifest.targets:
            record = {k: v for k, v in record.items() if k not in ("topk_ids", "topk_logprobs", "tail_logmass")}
            record |= {"sampled_nunique": record["loss_mask"].astype(np.uint8),
                       "sampled_ids": np.full(int(record["loss_mask"].sum()), 10, np.uint16),
                       "sampled_counts": np.full(int(record["loss_mask"].sum()), 4, np.uint8)}
        writer.write_shard(index, record)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _write_store(tmp_path_factory.mktemp("select") / "store")


def _select(store: Path, tmp_path: Path, **options) -> dict:
    options = {"key": "entropy", "order": "store", "held_out_fraction": 0.0, **options}
    config = SelectConfig(store=str(store), output=str(tmp_path / f"sel-{len(list(tmp_path.iterdir()))}.json"),
                          **options)
    written = select_samples(config)
    assert json.loads(Path(config.output).read_text()) == written
    return written


def test_top_bottom_and_band_cut_the_ranking_with_ties_by_sample_id(store, tmp_path):
    assert _select(store, tmp_path, bottom=0.1)["sample_ids"] == [1, 3]  # round(1.9); 11 ties with 3, higher id
    assert _select(store, tmp_path, bottom=0.15)["sample_ids"] == [1, 3, 11]
    assert _select(store, tmp_path, top=0.2)["sample_ids"] == [4, 9, 15, 19]  # round(3.8)
    assert _select(store, tmp_path, top=1.0)["sample_ids"] == sorted(BY_ENTROPY)  # sample 5 has no tokens
    assert _select(store, tmp_path, band=(0.5, 0.9))["sample_ids"] == sorted(BY_ENTROPY[10:17])  # ranks 10..16
    assert _select(store, tmp_path, band=(0.8, 1.0))["sample_ids"] == _select(store, tmp_path, top=0.2)["sample_ids"]
    assert _select(store, tmp_path, band=(0.0, 0.1))["sample_ids"] == [1, 3]


def test_other_keys(store, tmp_path):
    assert _select(store, tmp_path, key="nll", bottom=0.2)["sample_ids"] == [9, 11, 13, 15]   # 0.2 0.1 0.3 0.4
    assert _select(store, tmp_path, key="tail_mass", top=0.1)["sample_ids"] == [18, 19]        # 0.6, 0.7
    # top1 = TOP1 / TOKENS: 1.0 for 0, 7, 13 and for 12 (1 of 1 token); ties by id keep the highest ids.
    assert _select(store, tmp_path, key="top1", top=0.2)["sample_ids"] == [0, 7, 12, 13]
    assert _select(store, tmp_path, key="top1", top=0.1)["sample_ids"] == [12, 13]
    assert _select(store, tmp_path, key="top1", bottom=0.1)["sample_ids"] == [1, 9]          # 0.0 for 1, 9, 14


def test_orders_are_curricula_or_a_seeded_shuffle(store, tmp_path):
    top = [4, 15, 9, 19, 13, 2]  # the highest 6 of 19 (round(5.7)) by entropy, highest first
    assert _select(store, tmp_path, top=0.3, order="descending")["sample_ids"] == top
    assert _select(store, tmp_path, top=0.3, order="ascending")["sample_ids"] == top[::-1]
    assert _select(store, tmp_path, top=0.3, order="store")["sample_ids"] == sorted(top)
    # Ties keep ascending sample ids in both directions.
    assert _select(store, tmp_path, bottom=0.2, order="ascending")["sample_ids"] == [1, 3, 11, 14]
    assert _select(store, tmp_path, bottom=0.2, order="descending")["sample_ids"] == [14, 1, 3, 11]
    shuffled = [_select(store, tmp_path, top=0.5, order="shuffle", seed=seed)["sample_ids"] for seed in (1, 1, 2)]
    assert shuffled[0] == shuffled[1] != shuffled[2]
    assert sorted(shuffled[0]) == sorted(shuffled[2]) == sorted(BY_ENTROPY[-10:])  # round(9.5) = 10, half up


def test_min_tokens_and_the_held_out_tail_narrow_the_candidates(store, tmp_path):
    selected = _select(store, tmp_path, top=0.2, min_tokens=3)  # 12 (1 token) and 17 (2) are out: 17 candidates
    assert selected["sample_ids"] == [4, 9, 15]
    assert selected["counts"] == {"store_samples": 20, "held_out": 0, "without_tokens": 1, "below_min_tokens": 2,
                                  "candidates": 17, "selected": 3, "selected_tokens": 12}
    # The default holds out round(0.05 * 20) = 1 sample, the last, as student-train's --eval-fraction does.
    default = _select(store, tmp_path, top=0.2, held_out_fraction=0.05)
    assert default["sample_ids"] == [4, 9, 13, 15]  # 19 (1.7) is held out: 13 (1.6) takes its place
    assert default["counts"]["held_out"] == 1 and default["counts"]["candidates"] == 18


def test_the_file_says_what_was_selected(store, tmp_path):
    selected = _select(store, tmp_path, band=(0.5, 0.9), order="ascending", min_tokens=2)
    ids = selected["sample_ids"]
    assert selected["store"] == str(store.resolve()) and selected["key"] == "entropy"
    assert selected["rule"] == {"band": [0.5, 0.9]} and selected["order"] == "ascending"
    assert selected["key_range"] == pytest.approx({"min": ENTROPY[ids[0]], "max": ENTROPY[ids[-1]]}, rel=1e-6)
    assert selected["counts"]["selected"] == len(ids)
    assert selected["counts"]["selected_tokens"] == sum(TOKENS[i] for i in ids)


def test_version_1_store_selects_the_same_samples(tmp_path, store):
    old = _write_store(tmp_path / "v1", version=1)
    for options in ({"top": 0.3}, {"key": "top1", "bottom": 0.4, "order": "ascending"}):
        assert _select(old, tmp_path, **options)["sample_ids"] == _select(store, tmp_path, **options)["sample_ids"]


# --- the command line and its errors ------------------------------------------------------------------------------


def test_cli_writes_the_selection(store, tmp_path):
    output = tmp_path / "sub" / "sel.json"
    result = CliRunner().invoke(main, ["select", str(store), "--by", "entropy", "--band", "0.5:0.9",
                                       "--held-out-fraction", "0", "--order", "store", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())["sample_ids"] == sorted(BY_ENTROPY[10:17])
    assert "Selected 7 of 19 candidate samples" in result.output and "--selection" in result.output


@pytest.mark.parametrize(("arguments", "message"), [
    (["--by", "perplexity", "--top", "0.3"], "Invalid value for '--by'"),
    (["--by", "entropy", "--top", "0"], "--top: a share of the candidates in (0, 1], got 0.0"),
    (["--by", "entropy", "--top", "1.5"], "--top: a share of the candidates in (0, 1], got 1.5"),
    (["--by", "entropy", "--bottom", "-0.1"], "--bottom: a share"),
    (["--by", "entropy", "--band", "0.9:0.5"], "--band: LOW:HIGH quantiles with 0 <= LOW < HIGH <= 1, got 0.9:0.5"),
    (["--by", "entropy", "--band", "0.5:0.5"], "LOW < HIGH"),
    (["--by", "entropy", "--band", "0.5"], "--band: expected LOW:HIGH"),
    (["--by", "entropy", "--top", "0.3", "--bottom", "0.3"], "exactly one of --top, --bottom and --band (got --top, "
                                                             "--bottom)"),
    (["--by", "entropy"], "exactly one of --top, --bottom and --band (got none)"),
    (["--by", "entropy", "--top", "0.3", "--min-tokens", "0"], "--min-tokens: must be at least 1"),
    (["--by", "entropy", "--top", "0.3", "--held-out-fraction", "1"], "--held-out-fraction: must be in [0, 1)"),
    (["--by", "entropy", "--bottom", "0.01"], "--bottom 0.01 of 18 candidate samples selects none"),
])
def test_cli_refuses_bad_options(store, tmp_path, arguments, message):
    output = tmp_path / "sel.json"
    result = CliRunner().invoke(main, ["select", str(store), *arguments, "--output", str(output)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not output.exists()


def test_cli_refuses_an_existing_output_without_force(store, tmp_path):
    output = tmp_path / "sel.json"
    output.write_text("keep me")
    arguments = ["select", str(store), "--by", "nll", "--top", "0.5", "--output", str(output)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert output.read_text() == "keep me"
    assert CliRunner().invoke(main, [*arguments, "--force"]).exit_code == 0
    assert len(json.loads(output.read_text())["sample_ids"]) == 9  # round(0.5 * 18), half up


def test_cli_refuses_keys_the_store_lacks_and_missing_stores(tmp_path):
    sampled = _write_store(tmp_path / "sampled", targets={"sampled": {"num_draws": 4}})
    for key in ("tail_mass", "top1"):
        result = CliRunner().invoke(main, ["select", str(sampled), "--by", key, "--top", "0.3",
                                           "--output", str(tmp_path / "sel.json")])
        assert result.exit_code == 2, result.output
        assert f"--by {key}: needs top-k targets" in result.output and "its keys are entropy, nll" in result.output
    assert CliRunner().invoke(main, ["select", str(sampled), "--by", "nll", "--top", "0.3",
                                     "--output", str(tmp_path / "sel.json")]).exit_code == 0
    missing = CliRunner().invoke(main, ["select", str(tmp_path / "nowhere"), "--by", "nll", "--top", "0.3",
                                        "--output", str(tmp_path / "other.json")])
    assert missing.exit_code == 1 and "manifest.json" in missing.output


# --- end to end: student-train --selection ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("select-real"), llama_dir, corpus_texts[:12])


def test_student_train_reads_exactly_the_selection_in_its_order(real_store, llama_dir, tmp_path, monkeypatch):
    selection = tmp_path / "curriculum.json"
    result = CliRunner().invoke(main, ["select", str(real_store), "--by", "entropy", "--top", "0.5",
                                       "--order", "ascending", "--output", str(selection)])
    assert result.exit_code == 0, result.output
    written = json.loads(selection.read_text())
    ids, num_samples = written["sample_ids"], len(open_store(real_store))
    entropy = open_store(real_store).stats()["stats_entropy"][ids]
    assert list(entropy) == sorted(entropy) and len(ids) == written["counts"]["selected"] > 2
    assert written["counts"]["held_out"] == round(0.05 * num_samples) and max(ids) < num_samples - 1

    # The ids the training loop consumes, batch after batch (the evaluation loader reads the held-out tail).
    consumed = []

    class RecordingLoader(StoreLoader):
        def __iter__(self):
            for batch in super().__iter__():
                if self.config.selection is not None:
                    consumed.extend(batch["sample_ids"].tolist())
                yield batch

    monkeypatch.setattr(student_train.train, "StoreLoader", RecordingLoader)
    student = make_student_config(tmp_path / "student", llama_dir)
    result = CliRunner().invoke(student_main, [
        "--store", str(real_store), "--student", str(student), "--output", str(tmp_path / "run"),
        "--selection", str(selection), "--batch-size", "1", "--max-steps", str(2 * len(ids)), "--eval-every", "1000",
        "--save-every", "1000", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert consumed == ids + ids  # two epochs, each exactly the selection in its order

    # The loader alone, batches of 3 with a short last one: the same stream.
    loader = StoreLoader(LoaderConfig(store=str(real_store), batch_size=3, selection=str(selection),
                                      exclude_fraction_from_end=0.05, drop_last=False))
    assert [i for batch in loader for i in batch["sample_ids"].tolist()] == ids


def test_student_train_refuses_a_selection_in_the_held_out_tail(real_store, llama_dir, tmp_path):
    num_samples = len(open_store(real_store))
    selection = tmp_path / "with-held-out.json"
    selection.write_text(json.dumps({"sample_ids": [0, num_samples - 1]}))
    student = make_student_config(tmp_path / "student", llama_dir)
    result = CliRunner().invoke(student_main, [
        "--store", str(real_store), "--student", str(student), "--output", str(tmp_path / "run"),
        "--selection", str(selection), "--batch-size", "1", "--max-steps", "1", "--device", "cpu"])
    held_out_from = num_samples - round(0.05 * num_samples)
    assert result.exit_code == 2
    assert f"sample ids [{num_samples - 1}] are in the held-out tail (ids {held_out_from}..{num_samples - 1})" \
        in result.output
