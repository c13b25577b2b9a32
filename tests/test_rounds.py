"""`distill-rounds` end to end on tiny models, through click's CliRunner: two rounds from one call, a run killed at
each step of round 1 and resumed, and bad configs refused before anything runs.

The teacher is the session's tiny Llama and the student a smaller random Llama with weights, both with the Llama-2
tokenizer and a chat template. Expected values are read back independently: the stores' trained tokens and
true-token log-probs from their samples, the rollouts' rows from the generate outputs, the weights of each round's
student by their fingerprints; the resumed run is compared with the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, make_small_store
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import teacher_cache.cli as teacher_cli
import tools.rounds as rounds
from storage.generated import GeneratedWriter, read_generated
from storage.identity import weights_fingerprint
from storage.reader import Store
from storage.writer import StoreWriter
from student_train.train import Trainer
from tools.rounds_steps import BUILD, GENERATE, TRAIN, option_args

TEMPLATE = (  # Llama-2 style: a reply is its content then EOS, and the generation prompt ends with [/INST]
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PROMPTS = ["What is the capital of France?", "Name a prime number.", "Count to three.", "Why is the sky blue?"]
HELDOUT = ["Tell me a story about a cat.", "Explain gravity."]
SEED, EVAL_SEED = 3, 7
OPTIONS = {
    "generate": {"num_responses": 2, "max_new_tokens": 8, "batch_size": 4, "prompts_per_shard": 2, "device": "cpu",
                 "dtype": "float32"},
    "build": {"seq_len": 32, "pack": False, "targets": ["topk"], "top_k": 8, "samples_per_shard": 4,
              "batch_size": 4, "device": "cpu", "dtype": "float32"},
    "train": {"loss": {"rollout_rkl": 1.0}, "max_steps": 4, "batch_size": 2, "save_every": 2, "eval_every": 4,
              "lr": 0.001, "device": "cpu"},
    "eval_generate": {"num_responses": 1},
}
ALL_KEPT = {"keep_truncated": True, "keep_duplicates": True, "keep_empty": True}  # on-policy: nothing filtered
STEPS = ("generate", "build", "train", "eval_generate", "eval_build")
WORKER_VARIABLES = ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_ARRAY_TASK_COUNT")


class Killed(Exception):
    """Stands for the process being killed."""


KILLED = "injected kill"

@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """No launcher's environment decides the workers."""
    for name in WORKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _save_with_template(model, path: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = TEMPLATE
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return path


@pytest.fixture(scope="module")
def setup(llama_dir, corpus_texts, tmp_path_factory) -> dict:
    """The teacher, the initial student, the prompts and a held-out store: the config's paths."""
    root = tmp_path_factory.mktemp("rounds")
    (root / "eval").mkdir()
    teacher = _save_with_template(LlamaForCausalLM.from_pretrained(llama_dir), root / "teacher")
    torch.manual_seed(1)
    student = _save_with_template(LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)), root / "student")
    return {"teacher": str(teacher), "student": str(student), "prompts": str(_jsonl(root / "prompts.jsonl", PROMPTS)),
            "heldout_prompts": str(_jsonl(root / "heldout.jsonl", HELDOUT)),
            "eval_store": str(make_small_store(root / "eval", teacher, corpus_texts[:12])),
            "rounds": 2, "seed": SEED, "eval_seed": EVAL_SEED, **OPTIONS}


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def distill(config: Path, *overrides: str):
    return CliRunner().invoke(rounds.main, ["--config", str(config), *overrides])


class _Messages(logging.Handler):
    """Keeps the messages it is given."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> dict:
    """One uninterrupted run of two rounds: its directory, what it printed and the command lines it logged."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "rounds.yaml", {**setup, "output": str(root / "run")})
    logger, handler = logging.getLogger("tools.rounds_steps"), _Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = distill(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert result.exit_code == 0, (result.output, result.exception)
    return {"run": root / "run", "config": config, "output": result.output, "log": handler.messages}


def _trained_tokens(store: Path) -> int:
    """Loss-mask positions counted over the store's samples."""
    return sum(int(sample["loss_mask"].sum()) for sample in Store(store))


def _teacher_logprobs(store: Path) -> np.ndarray:
    """The teacher's log-prob of every trained token of the store."""
    return np.concatenate([sample["true_logprob"][sample["loss_mask"]] for sample in Store(store)]).astype(np.float64)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _generation(path: Path) -> dict:
    return _json(path / "generation.json")


def _without_seconds(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key not in ("seconds", "seconds_total")}


# 1. Two rounds from one call ------------------------------------------------------------------------------------------


def test_two_rounds_write_every_artefact_and_chain_the_students(reference, setup):
    run = reference["run"]
    for r in range(2):
        round_dir = run / f"round-{r}"
        for commit in ("rollouts/generation.json", "store/manifest.json", "train/final_metrics.json",
                       "train/model.safetensors", "eval/rollouts/generation.json", "eval/store/manifest.json",
                       "summary.json", "timings.json"):
            assert (round_dir / commit).is_file(), (r, commit)
        assert Store(round_dir / "store").manifest.complete and Store(round_dir / "eval" / "store").manifest.complete
    assert (run / "initial" / "eval" / "store" / "manifest.json").is_file()
    assert not (run / "round-2").exists()
    # Round r's answers are written by STUDENT_r: the initial student, then round r-1's trained one; its held-out
    # answers by the student it trained.
    students = [Path(setup["student"]), run / "round-0" / "train"]
    for r, student in enumerate(students):
        generator = _generation(run / f"round-{r}" / "rollouts")["generator"]
        assert generator["model"] == str(student) and generator["weights_sha256"] == weights_fingerprint(student)
        assert _generation(run / f"round-{r}" / "rollouts")["sampling"]["seed"] == SEED + r
        assert _generation(run / f"round-{r}" / "rollouts")["filters"] == ALL_KEPT
        trained = json.loads((run / f"round-{r}" / "train" / "train_config.json").read_text())
        assert trained["student"] == str(student) and trained["eval_store"] == setup["eval_store"]
        held_out = _generation(run / f"round-{r}" / "eval" / "rollouts")
        assert held_out["generator"]["weights_sha256"] == weights_fingerprint(run / f"round-{r}" / "train")
        assert held_out["sampling"]["seed"] == EVAL_SEED and held_out["sampling"]["num_responses"] == 1
        assert held_out["filters"] == ALL_KEPT
    assert _generation(run / "initial" / "eval" / "rollouts")["generator"]["weights_sha256"] == weights_fingerprint(
        students[0])
    fingerprints = {weights_fingerprint(path) for path in [*students, run / "round-1" / "train"]}
    assert len(fingerprints) == 3  # each round trained its student


def test_summaries_count_what_the_outputs_hold(reference):
    run = reference["run"]
    initial = json.loads((run / "initial" / "summary.json").read_text())
    cumulative = _trained_tokens(run / "initial" / "eval" / "store")
    assert initial["teacher_tokens"]["cumulative"] == initial["teacher_tokens"]["round"] == cumulative
    summaries = [initial]
    for r in range(2):
        round_dir = run / f"round-{r}"
        summary = json.loads((round_dir / "summary.json").read_text())
        summaries.append(summary)
        train_tokens, eval_tokens = _trained_tokens(round_dir / "store"), _trained_tokens(round_dir / "eval" / "store")
        cumulative += train_tokens + eval_tokens
        assert summary["teacher_tokens"] == {"train_store": train_tokens, "eval_store": eval_tokens,
                                             "round": train_tokens + eval_tokens, "cumulative": cumulative}
        rows, _ = read_generated(round_dir / "rollouts")
        lengths = [len(ids) for ids in rows["response_token_ids"]]
        assert summary["rollouts"]["responses"] == len(rows) == len(PROMPTS) * 2
        assert summary["rollouts"]["mean_tokens"] == pytest.approx(np.mean(lengths))
        assert summary["rollouts"]["truncated_share"] == pytest.approx(
            np.mean([reason == "length" for reason in rows["finish_reason"]]))
        assert summary["held_out"] == json.loads((round_dir / "train" / "final_metrics.json").read_text())
        logprobs = _teacher_logprobs(round_dir / "eval" / "store")
        responses = len(read_generated(round_dir / "eval" / "rollouts")[0])
        assert summary["teacher_loglik"]["per_token"] == pytest.approx(logprobs.mean(), rel=1e-5)
        assert summary["teacher_loglik"]["per_response"] == pytest.approx(logprobs.sum() / responses, rel=1e-5)
        assert set(summary["seconds"]) == set(STEPS) and all(value > 0 for value in summary["seconds"].values())
    assert json.loads((run / "summary.json").read_text()) == {"rounds": summaries}
    table = (run / "summary.md").read_text()
    assert table in reference["output"] and [line.split(" | ")[0] for line in table.splitlines()[2:]] == [
        "| initial", "| 0", "| 1"]


def test_a_logged_command_line_runs_the_step_by_hand(reference, tmp_path):
    """The logged command of round 1's held-out build, run by hand into another output, builds the same store."""
    run = reference["run"]
    prefix = "round 1, eval_build: "
    line = next(line for line in reference["log"] if line.startswith(prefix))[len(prefix):]
    args = shlex.split(line)
    assert args[:2] == ["teacher-cache", "build"]
    args[args.index("--output") + 1] = str(tmp_path / "store")
    result = CliRunner().invoke(teacher_cli.main, args[1:])
    assert result.exit_code == 0, result.output
    assert _trained_tokens(tmp_path / "store") == _trained_tokens(run / "round-1" / "eval" / "store")
    np.testing.assert_array_equal(_teacher_logprobs(tmp_path / "store"),
                                  _teacher_logprobs(run / "round-1" / "eval" / "store"))


def test_more_rounds_extend_a_finished_run(reference, setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    before = {name: (run / name / "summary.json").read_bytes() for name in ("initial", "round-0", "round-1")}
    result = distill(write_config(tmp_path / "rounds.yaml", {**setup, "output": str(run)}), "rounds=3")
    assert result.exit_code == 0, (result.output, result.exception)
    generator = _generation(run / "round-2" / "rollouts")["generator"]
    assert generator["weights_sha256"] == weights_fingerprint(run / "round-1" / "train")
    assert _generation(run / "round-2" / "rollouts")["sampling"]["seed"] == SEED + 2
    assert {name: (run / name / "summary.json").read_bytes() for name in before} == before
    summaries = _json(run / "summary.json")["rounds"]
    assert [s["round"] for s in summaries] == ["initial", 0, 1, 2]
    scored = _trained_tokens(run / "round-2" / "store") + _trained_tokens(run / "round-2" / "eval" / "store")
    assert summaries[3]["teacher_tokens"]["cumulative"] == summaries[2]["teacher_tokens"]["cumulative"] + scored


def test_prompts_per_round_walk_through_the_prompts(setup, tmp_path):
    """Round r answers rows r*N .. (r+1)*N - 1 of the prompts, wrapping around: with 4 prompts and N = 3, round 0
    answers prompts 0, 1, 2 and round 1 answers 3, 0, 1."""
    values = {key: value for key, value in setup.items() if key not in ("heldout_prompts", "eval_generate")}
    values |= {"output": str(tmp_path / "run"), "prompts_per_round": 3}
    result = distill(write_config(tmp_path / "rounds.yaml", values))
    assert result.exit_code == 0, (result.output, result.exception)
    for r, expected in enumerate([[0, 1, 2], [3, 0, 1]]):
        rows, _ = read_generated(tmp_path / "run" / f"round-{r}" / "rollouts")
        asked = [row["messages"][0]["content"] for row in rows.to_list() if row["response_index"] == 0]
        assert asked == [PROMPTS[i] for i in expected], r


# 2. Killed at each step of round 1, then resumed ----------------------------------------------------------------------


def _ends(path, suffix: str) -> bool:
    return str(path).endswith(suffix)


def _fail_generate_shard(monkeypatch):
    """generate dies after the first of its two shards is committed."""
    original = GeneratedWriter.write_shard

    def write_shard(self, shard, rows, counts):
        if _ends(self.location, "round-1/rollouts") and shard >= 1:
            raise Killed(f"{KILLED} while generating")
        return original(self, shard, rows, counts)

    monkeypatch.setattr(GeneratedWriter, "write_shard", write_shard)


def _fail_build_shard(monkeypatch):
    """build dies after the first of its two shards is committed."""
    original = StoreWriter.write_shard

    def write_shard(self, index, record):
        if _ends(self.location, "round-1/store") and index >= 1:
            raise Killed(f"{KILLED} while building")
        return original(self, index, record)

    monkeypatch.setattr(StoreWriter, "write_shard", write_shard)


def _fail_training_at(step: int):
    """student-train dies before its optimizer step `step` + 1 (with --save-every 2: after the checkpoint of step 2
    for step 3, before any checkpoint for step 1)."""

    def inject(monkeypatch):
        original = Trainer._train_step

        def train_step(self, batches):
            if _ends(self.output, "round-1/train") and self.step == step:
                raise Killed(f"{KILLED} while training")
            return original(self, batches)

        monkeypatch.setattr(Trainer, "_train_step", train_step)

    return inject


def _fail_eval_generate_start(monkeypatch):
    """The held-out generate dies before it writes anything."""
    original = teacher_cli.generate_responses

    def generate_responses(config, **kwargs):
        if _ends(config.output, "round-1/eval/rollouts"):
            raise Killed(f"{KILLED} before generating")
        return original(config, **kwargs)

    monkeypatch.setattr(teacher_cli, "generate_responses", generate_responses)


def _fail_eval_build_finish(monkeypatch):
    """The held-out build dies with every shard committed, before its manifest says complete."""
    original = StoreWriter.finish

    def finish(self, *args, **kwargs):
        if _ends(self.location, "round-1/eval/store"):
            raise Killed(f"{KILLED} while finishing the build")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "finish", finish)


def _fail_summary(monkeypatch):
    """The driver dies after round 1's steps, before its summary."""
    original = rounds.held_out_metrics

    def held_out_metrics(train):
        if _ends(train, "round-1/train"):
            raise Killed(f"{KILLED} before the summary")
        return original(train)

    monkeypatch.setattr(rounds, "held_out_metrics", held_out_metrics)


FAULTS = [
    # (the fault, what it leaves in round-1, what the rerun logs for its step)
    (_fail_generate_shard, lambda d: (d / "rollouts/data/shard-00000.json").exists()
     and not (d / "rollouts/generation.json").exists(), "round 1, generate: teacher-cache generate"),
    (_fail_build_shard, lambda d: len(_json(d / "store/manifest.json")["shards"]) == 1
     and not _json(d / "store/manifest.json")["complete"], "round 1, build: teacher-cache build"),
    (_fail_training_at(1), lambda d: (d / "train").is_dir() and not (d / "train/checkpoints").exists(),
     "round 1, train: removing"),
    (_fail_training_at(3), lambda d: (d / "train/checkpoints/step-0000002").is_dir()
     and not (d / "train/final_metrics.json").exists(), "round 1, train: student-train"),
    (_fail_eval_generate_start, lambda d: (d / "train/final_metrics.json").exists()
     and not (d / "eval/rollouts/generation.json").exists(), None),
    (_fail_eval_build_finish, lambda d: len(_json(d / "eval/store/manifest.json")["shards"]) == 1
     and not _json(d / "eval/store/manifest.json")["complete"], "round 1, eval_build: teacher-cache build"),
    (_fail_summary, lambda d: (d / "eval/store/manifest.json").exists() and not (d / "summary.json").exists(), None),
]


def test_a_run_killed_at_each_step_of_round_1_resumes_to_the_uninterrupted_result(reference, setup, tmp_path,
                                                                                  monkeypatch, caplog):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("initial", "round-0", "rounds_config.json"):  # round 0 done, as by the reference run
        copy = shutil.copytree if (reference["run"] / name).is_dir() else shutil.copy
        copy(reference["run"] / name, run / name)
    config = write_config(tmp_path / "rounds.yaml", {**setup, "output": str(run)})
    caplog.set_level(logging.INFO, logger="tools.rounds_steps")
    resumed = []  # what each rerun logged for the step the previous run was killed in
    for inject, left, _ in [*FAULTS, (None, None, None)]:
        caplog.clear()
        with monkeypatch.context() as patch:
            if inject is not None:
                inject(patch)
            result = distill(config)
        resumed.append([message for message in caplog.messages if message.startswith("round 1")])
        if inject is None:
            assert result.exit_code == 0, (result.output, result.exception)
            break
        assert result.exit_code == 1 and KILLED in str(result.exception) + result.output, result.output
        assert left(run / "round-1"), (inject, sorted(str(p.relative_to(run)) for p in run.rglob("*")))
    # Each rerun continued the step its predecessor was killed in: with --resume, or from scratch where the killed
    # step had left nothing to resume from.
    for (_, _, logged), messages in zip(FAULTS, resumed[1:], strict=True):
        if logged is not None:
            step = next(message for message in messages if message.startswith(logged))
            assert step.endswith("--resume") or "removing" in step, messages
    reference_run = reference["run"]
    weights, expected = load_file(run / "round-1/train/model.safetensors"), load_file(
        reference_run / "round-1/train/model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    for name in ("round-1/summary.json", "summary.json"):
        got, want = _json(run / name), _json(reference_run / name)
        if name == "summary.json":
            got, want = [_without_seconds(s) for s in got["rounds"]], [_without_seconds(s) for s in want["rounds"]]
        else:
            got, want = _without_seconds(got), _without_seconds(want)
        assert got == want, name


# 3. Bad configs ------------------------------------------------------------------------------------------------------


def assert_usage_error(result, *fragments: str) -> None:
    """Exit code 2 (click.UsageError), no traceback, and every fragment in the message."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in " ".join(result.output.split()), (fragment, result.output)


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["teacher=/no/such/teacher"], ["teacher /no/such/teacher: no such directory"]),
    (["rounds=0"], ["rounds: must be at least 1, got 0"]),
    (["heldout_prompts=/no/such.jsonl"], ["heldout_prompts /no/such.jsonl: no such file or directory"]),
    (["generate={tmperature: 0.5}"], ["generate: unknown option(s) tmperature (did you mean temperature?)"]),
    (["generate={seed: 5, max_new_tokens: 8}"], ["generate: seed set by distill-rounds itself"]),
    (["build={top_k: 0}"], ["initial student, eval_build:", "--top-k: must be at least 1, got 0"]),
    (["train={loss: {kl: 1}}"], ["round 0, train:", "'kl' is not a loss"]),
    (["eval_generate={max_prompts: 0}"], ["initial student, eval_generate:", "--max-prompts: must be at least 1"]),
    (["heldout_prompts=", "eval_generate={num_responses: 2}"], ["eval_generate: options of the answers to "
                                                                 "heldout_prompts, which is not given"]),
], ids=["missing-teacher", "rounds-0", "missing-heldout", "unknown-option", "driver-option", "build-refuses",
        "train-refuses", "eval-generate-refuses", "eval-without-heldout"])
def test_a_bad_config_is_refused_before_anything_runs(overrides, fragments, setup, tmp_path):
    config = write_config(tmp_path / "rounds.yaml", {**setup, "output": str(tmp_path / "run")})
    assert_usage_error(distill(config, *overrides), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_rerun_with_another_config_is_refused(reference):
    run = reference["run"]
    before = {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert_usage_error(distill(reference["config"], "seed=4", "train={max_steps: 5}"),
                       "was started with another config; changed: seed 3 -> 4; train", "only rounds may change")
    assert_usage_error(distill(reference["config"], "rounds=1"), "rounds 1:", "holds round 1 already",
                       "pass rounds 2 or more")
    assert {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_failing_step_is_a_message_naming_it_and_its_command(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hello."}]}) + "\n")
    values = {**setup, "prompts": str(bad), "heldout_prompts": None, "eval_generate": {}, "output": str(tmp_path / "r")}
    result = distill(write_config(tmp_path / "rounds.yaml", values))
    assert result.exit_code == 1 and "Traceback" not in result.output, (result.output, result.exception)
    for fragment in ("round 0, generate failed:", "row 0 has no user turn", "The command was: teacher-cache generate "
                     f"--model {setup['student']} --prompts {bad}", "rerun distill-rounds with the same config"):
        assert fragment in result.output, (fragment, result.output)


# 4. Options as flags -------------------------------------------------------------------------------------------------


def test_option_mappings_become_the_sub_commands_flags():
    assert option_args(GENERATE, {"num_responses": 4, "stop": ["###", "\n\n"], "prompt_template": None,
                                  "temperature": 0.5}, "generate") == [
        "--num-responses", "4", "--stop", "###", "--stop", "\n\n", "--temperature", "0.5"]
    assert option_args(BUILD, {"targets": ["topk", "sampled"], "num_draws": 20, "pack": False, "hidden_layers": -1,
                               "allow_long_context": False, "strict": True, "dataset_format": "messages"}, "build") == [
        "--targets", "topk,sampled", "--samples", "20", "--no-pack", "--hidden-layers", "-1", "--strict",
        "--format", "messages"]
    assert option_args(TRAIN, {"loss": {"reverse_kl": 0.9, "ce": 0.1}, "lr": 3e-4,
                               "feature_loss": "mse", "feature_layers": [[1, 2]]}, "train") == [
        "--loss", "reverse_kl=0.9", "--loss", "ce=0.1", "--lr", "0.0003", "--feature-loss", "mse",
        "feature_layers=[[1, 2]]"]
