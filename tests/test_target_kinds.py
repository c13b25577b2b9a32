"""The target-kind seam: the store, teacher and student registries agree, and what the store side composes from
a manifest's `targets` (arrays per format version, description, batch tensors, merge keys, default representation)
equals what is written out here by hand."""

import numpy as np
import pytest
import torch

from storage.targets import KINDS, array_specs, collate_targets, concat_key, describe_targets, present_kinds
from student_train.collate import TAIL_BUCKET
from student_train.divergences import REPRESENTATIONS, TARGET_KEYS
from student_train.targets import STUDENT_KINDS, check_targets, default_targets, eval_targets
from teacher_cache.config import TARGET_KINDS
from teacher_cache.targets import EXTRACTORS

BASE = {"input_ids", "attention_mask", "loss_mask", "segment_ids", "entropy", "true_logprob"}
STATS = {"stats_num_tokens", "stats_entropy", "stats_nll"}
TOPK_STATS = {"stats_tail_mass", "stats_true_rank"}
DRAWS = {"sampled_nunique", "sampled_offsets", "sampled_ids", "sampled_counts"}
TOPK = {"topk": {"k": 4}}
SAMPLED = {"sampled": {"num_draws": 8, "seed": 1}}
HYBRID = {"topk": {"k": 4}, "sampled": {"num_draws": 8, "seed": 1, "draws_from": "tail"}}
HIDDEN = {"hidden_states": {"layers": [0, 2], "dtype": "float32", "hidden_size": 16}}


def test_every_kind_registers_under_one_name_on_each_side():
    assert set(EXTRACTORS) <= set(KINDS) and set(STUDENT_KINDS) <= set(KINDS)
    assert set(EXTRACTORS) == set(STUDENT_KINDS) == set(TARGET_KINDS) == {"topk", "sampled", "hybrid"}
    readers = [name for kind in STUDENT_KINDS.values() for name in kind.representations]
    assert sorted(readers) == sorted(REPRESENTATIONS)  # each store representation read by exactly one kind


@pytest.mark.parametrize("name,targets", [("topk", TOPK), ("sampled", SAMPLED), ("hybrid", HYBRID)])
def test_a_representation_reads_only_what_its_kind_collates(name, targets):
    record = _record(targets)
    batch = collate_targets(record, targets)
    for representation in STUDENT_KINDS[name].representations:
        assert set(TARGET_KEYS[representation]) <= set(batch), representation


@pytest.mark.parametrize("targets,present", [
    ({}, []), (TOPK, ["topk"]), (SAMPLED, ["sampled"]), (TOPK | SAMPLED, ["topk", "sampled"]),
    (HYBRID, ["topk", "hybrid"]), (TOPK | HIDDEN, ["topk", "hidden"]),
])
def test_present_kinds(targets, present):
    assert [kind.name for kind in present_kinds(targets)] == present


def test_arrays_of_each_format_version():
    both = TOPK | SAMPLED
    assert set(array_specs(vocab_size=100, targets=both, format_version=1)) == (
        BASE | {"topk_ids", "topk_logprobs", "tail_logmass"} | DRAWS)
    assert set(array_specs(vocab_size=100, targets=both, format_version=2)) == (
        BASE | {"topk_ids", "topk_logprobs", "tail_logmass"} | DRAWS | STATS | TOPK_STATS)
    for version in (3, 4):
        specs = array_specs(vocab_size=100, targets=HYBRID | HIDDEN, format_version=version)
        assert set(specs) == (BASE | {"topk_ids", "topk_logprob_floor", "topk_logprob_excess", "tail_logmass"} | DRAWS
                              | {"hidden_states_0", "hidden_states_2"} | STATS | TOPK_STATS)
        assert specs["hidden_states_2"].dtype == np.float32 and specs["hidden_states_2"].axes == ("S", "L", "H")
        assert "drawn from the tail" in specs["sampled_ids"].description
    assert set(array_specs(vocab_size=100, targets=SAMPLED)) == BASE | DRAWS | STATS
    bucket = {"sampled": {"num_draws": 300, "tail_bucket_id": 1 << 16}}
    specs = array_specs(vocab_size=1 << 16, targets=TOPK | bucket)
    assert specs["sampled_ids"].dtype == np.uint32 and specs["input_ids"].dtype == np.uint16
    assert specs["sampled_counts"].dtype == np.uint16


def test_descriptions():
    assert describe_targets({}) == "entropy and true-token log-prob only"
    assert describe_targets(TOPK | SAMPLED | HIDDEN) == (
        "topk: top-4 + tail mass; sampled: 8 draws (full distribution, multinomial)")
    assert describe_targets(HYBRID) == (
        "hybrid: top-4 + tail mass, 8 draws from the tail outside the top-4 (multinomial)")
    systematic = TOPK | {"sampled": SAMPLED["sampled"] | {"draw_scheme": "systematic"}}
    assert describe_targets(systematic) == "topk: top-4 + tail mass; sampled: 8 draws (full distribution, systematic)"


def test_collate_pads_draws_and_maps_the_tail_bucket():
    targets = TOPK | {"sampled": {"num_draws": 3, "tail_bucket_id": 50}}
    record = {"topk_ids": np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]], np.uint16),
              "topk_logprobs": np.full((1, 2, 4), -1.5, np.float32), "tail_logmass": np.full((1, 2), -2.0, np.float32),
              "sampled_nunique": np.array([[2, 1]], np.uint8), "sampled_ids": np.array([3, 50, 7], np.uint16),
              "sampled_counts": np.array([1, 2, 3], np.uint8)}
    batch = collate_targets(record, targets)
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_logprobs"].dtype == torch.float32
    assert batch["sampled_ids"].tolist() == [[[3, TAIL_BUCKET], [7, 0]]]
    assert batch["sampled_counts"].tolist() == [[[1.0, 2.0], [3.0, 0.0]]]


def test_concat_key_ignores_seeds_and_log_prob_encodings():
    old = {"topk": {"k": 4, "logprob_dtype": "float16"}, "sampled": {"num_draws": 8, "seed": 1}}
    new = {"topk": {"k": 4, "logprob_step": 1 / 64}, "sampled": {"num_draws": 8, "seed": 2}}
    assert concat_key(old) == concat_key(new)
    assert concat_key(HYBRID) != concat_key(TOPK | SAMPLED)


@pytest.mark.parametrize("targets,train,held_out", [
    (TOPK, "topk_tail", "topk_tail"), (SAMPLED, "sampled", "sampled"), (TOPK | SAMPLED, "topk_tail", "topk_tail"),
    (HYBRID, "hybrid", "topk_tail"),
])
def test_default_and_held_out_representations(targets, train, held_out):
    assert default_targets(targets) == train and eval_targets(targets) == held_out
    check_targets(train, targets)


def test_a_store_without_the_kind_names_the_build():
    with pytest.raises(ValueError, match="teacher-cache build --targets topk"):
        check_targets("topk_renorm", SAMPLED)
    with pytest.raises(ValueError, match="use --targets-from hybrid"):
        check_targets("sampled", HYBRID)


def _record(targets: dict) -> dict[str, np.ndarray]:
    record = {"topk_ids": np.zeros((1, 2, 4), np.uint16), "topk_logprobs": np.zeros((1, 2, 4), np.float32),
              "tail_logmass": np.zeros((1, 2), np.float32)}
    if "sampled" in targets:
        record |= {"sampled_nunique": np.ones((1, 2), np.uint8), "sampled_ids": np.array([1, 2], np.uint16),
                   "sampled_counts": np.array([8, 8], np.uint8)}
    return record


def test_ensemble_rules_keep_what_mixes_and_name_what_they_drop(caplog):
    names = ["a", "b"]
    plan = {name: kind.ensemble(names, [HYBRID | HIDDEN, HYBRID], weights=[0.5, 0.5], top_k=None)
            for name, kind in KINDS.items()}
    assert plan == {"topk": 4, "sampled": None, "hybrid": None, "hidden": None, "rollout": None}
    assert "draws of a, b come from the tail" in caplog.text and "hidden states dropped: those of a" in caplog.text
    caplog.clear()
    # Behaviour log-probs describe the generator, not a teacher: never mixed, the stores that hold them named.
    assert KINDS["rollout"].ensemble(names, [TOPK, TOPK | {"rollout": {}}], weights=[0.5, 0.5], top_k=None) is None
    assert "rollout targets dropped: those of b cannot be ensembled" in caplog.text
    caplog.clear()
    pooled = KINDS["sampled"].ensemble(names, [SAMPLED, TOPK | SAMPLED], weights=[0.75, 0.25], top_k=None)
    assert pooled == [6, 2] and not caplog.text  # 8 draws split 3:1
    assert KINDS["topk"].ensemble(names, [TOPK, SAMPLED], weights=[0.5, 0.5], top_k=None) is None
    assert "top-k targets dropped: b hold none" in caplog.text
    with pytest.raises(ValueError, match="--top-k 5 exceeds the largest k of the stores"):
        KINDS["topk"].ensemble(names, [TOPK, TOPK], weights=[0.5, 0.5], top_k=5)
