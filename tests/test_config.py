"""Config files of `student-train`: precedence (command line > KEY=VALUE > file > defaults), unknown keys and wrong
types refused with the fix, TrainConfig's own errors traced to the file or override that set the value, the resolved
config saved beside the outputs, a resume with other options refused, and every file in examples/ trains."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, make_small_store, make_student_config

import student_train.train
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.config_file import resolve_options
from student_train.train import train

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
REQUIRED = ["store=s", "student=t", "output=o"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    """Top-k and sampled targets, so that every example finds its targets."""
    root = tmp_path_factory.mktemp("config-store")
    return make_small_store(root, llama_dir, corpus_texts[:24])


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_dir) -> Path:
    path = tmp_path_factory.mktemp("config-student")
    make_student_config(path, llama_dir, max_positions=64)
    return path


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """The configs the CLI would train, without training."""
    seen = []
    monkeypatch.setattr(student_train.train, "train", lambda config: seen.append(config) or {})
    return seen


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _short(store: Path, student: Path, output: Path) -> list[str]:
    """Overrides that make any config a two-step run on the tiny store."""
    return [f"store={store}", f"student={student}", f"output={output}", "max_steps=2", "batch_size=4", "grad_accum=1",
            "warmup_steps=1", "eval_fraction=0.2", "eval_every=2", "save_every=2", "device=cpu"]


# --- precedence and forms -------------------------------------------------------------------------------------------


def test_command_line_beats_overrides_beat_the_file_beats_defaults(tmp_path, captured):
    config_file = _yaml(tmp_path, "store: s\nstudent: t\noutput: o\nlr: 0.01\nbatch_size: 2\nseed: 5\n"
                                  "temperature: 2.0\nloss: [jsd=0.7, ce=0.3]\n")
    result = _run("--config", config_file, "lr=0.02", "batch_size=3", "--lr", "0.03", "warmup_steps=7")
    assert result.exit_code == 0, result.output
    config = captured.pop()
    assert (config.lr, config.batch_size, config.seed, config.warmup_steps) == (0.03, 3, 5, 7)
    # temperature's click default (1.0) is no option given on the command line: the file's value stays
    assert (config.temperature, config.loss, config.grad_accum, config.eval_every) == (2.0, ["jsd=0.7", "ce=0.3"], 1,
                                                                                       200)
    # no file: the overrides alone, after the options or before them
    result = _run("--store", "s", "output=o", "--student", "t", "max_steps=9", "loss=[tv=1]")
    assert result.exit_code == 0, result.output
    assert (captured[0].store, captured[0].output, captured[0].max_steps, captured[0].loss) == ("s", "o", 9, ["tv=1.0"])


@pytest.mark.parametrize("loss", ["[jsd=0.7, ce=0.3]", "{jsd: 0.7, ce: 0.3}", "[{jsd: 0.7}, {ce: 0.3}]",
                                  "[jsd: 0.7, ce: 0.3]"])
def test_the_yaml_forms_of_the_loss(tmp_path, loss):
    options, _ = resolve_options(_yaml(tmp_path, f"store: s\nstudent: t\noutput: o\nloss: {loss}\n"), [], {})
    assert TrainConfig(**options).loss == ["jsd=0.7", "ce=0.3"]


@pytest.mark.parametrize("override,key,value", [
    ("lr=3e-4", "lr", 3e-4),  # a float, as in YAML 1.2 (PyYAML alone reads the string '3e-4')
    ("lr=1", "lr", 1.0),  # an int where a float is expected
    ("eval_store=", "eval_store", None),
    ("keep_layers=[0, -1]", "keep_layers", [0, -1]),
    ("keep_layers=0,2", "keep_layers", "0,2"),
    ("kd_schedule=linear_warmup:10", "kd_schedule", "linear_warmup:10"),
    ("resume=true", "resume", True),
    ("loss=forward_kl=1", "loss", "forward_kl=1"),
])
def test_override_values_are_yaml(override, key, value):
    options, sources = resolve_options(None, [override], {})
    assert options[key] == value and type(options[key]) is type(value)
    assert sources == {key: f"by {override}"}


# --- validation errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,override,message", [
    ("max_step: 10\n", None, "unknown option(s) max_step (did you mean max_steps or warmup_steps?)"),
    ("", "kd_shedule=constant", "kd_shedule=constant: unknown option(s) kd_shedule (did you mean kd_schedule?)"),
    ("learning_rate: 0.1\nbatch: 4\n", None, "unknown option(s) learning_rate, batch (did you mean batch_size?)"),
    ("", "max-steps=3", "max-steps (did you mean max_steps"),
])
def test_unknown_keys_are_refused_with_the_closest(tmp_path, captured, text, override, message):
    config_file = _yaml(tmp_path, text)
    result = _run("--config", config_file, *REQUIRED, *([override] if override else []))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "the options are store, output, student" in result.output and "lr" in result.output
    assert not captured


@pytest.mark.parametrize("text,override,message", [
    ("lr: fast\n", None, "lr must be float, got str 'fast'"),
    ("max_steps: 2.5\n", None, "max_steps must be int or null, got float 2.5"),
    ("resume: 1\n", None, "resume must be bool, got int 1"),
    ("batch_size: true\n", None, "batch_size must be int, got bool True"),
    ("loss: 5\n", None, "loss must be list of str or str, got int 5"),
    ("", "keep_layers=[0, x]", "keep_layers=[0, x]: keep_layers must be list of int or str or null, got list [0, 'x']"),
    ("", "lr=", "lr=: lr must be float, got null"),
    ("", "targets_from=[sampled]", "targets_from must be str or null, got list ['sampled']"),
])
def test_values_of_the_wrong_type_name_the_expected_type(tmp_path, captured, text, override, message):
    result = _run("--config", _yaml(tmp_path, text), *REQUIRED, *([override] if override else []))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not captured


@pytest.mark.parametrize("text,message", [
    ("- lr: 0.1\n", "expected a mapping of option names to values (max_steps: 2000), got a list"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_a_file_that_is_no_mapping_is_refused(tmp_path, captured, text, message):
    config_file = _yaml(tmp_path, text)
    result = _run("--config", config_file, *REQUIRED)
    assert result.exit_code == 2 and f"--config {config_file}: {message}" in result.output, result.output


def test_an_argument_that_is_no_override_is_refused(captured):
    result = _run("lr=0.1", "fast", *REQUIRED)
    assert result.exit_code == 2 and "'fast': expected an option or KEY=VALUE" in result.output, result.output
    result = _run("lr=[0.1", *REQUIRED)
    assert result.exit_code == 2 and "lr=[0.1: the value is not YAML" in result.output, result.output
    result = _run("chek", *REQUIRED)  # no "=": a subcommand, misspelt
    assert result.exit_code == 2 and "No such command 'chek'" in result.output, result.output
    assert not captured


@pytest.mark.parametrize("text,args,message", [
    ("max_steps: 0\n", [], "--max-steps: must be at least 1, got 0. (max_steps set in {file})"),
    ("", ["temperature=-1"], "--temperature: must be positive, got -1.0. (temperature set by temperature=-1)"),
    ("jsd_beta: 1.0\n", [], "(jsd_beta set in {file})"),
    ("loss: [jsd=1]\nalpha: 0.5\n", [], "(loss set in {file}, alpha set in {file})"),
    ("max_steps: 0\n", ["--max-steps", "0"], "--max-steps: must be at least 1, got 0.\n"),  # the command line's
])
def test_config_errors_name_the_key_and_where_it_was_set(tmp_path, captured, text, args, message):
    config_file = _yaml(tmp_path, text)
    result = _run("--config", config_file, *REQUIRED, *args)
    assert result.exit_code == 2 and message.format(file=config_file) in result.output, result.output
    assert not captured


def test_min_lr_fraction_and_keep_checkpoints_have_flags(captured):
    result = _run(*REQUIRED, "--min-lr-fraction", "0.25", "--keep-checkpoints", "5")
    assert result.exit_code == 0, result.output
    assert (captured[0].min_lr_fraction, captured[0].keep_checkpoints) == (0.25, 5)
    result = _run(*REQUIRED, "--min-lr-fraction", "1.5")
    assert result.exit_code == 2 and "--min-lr-fraction: must be within [0, 1], got 1.5." in result.output
    result = _run(*REQUIRED, "--keep-checkpoints", "0")
    assert result.exit_code == 2 and "--keep-checkpoints: must be at least 1, got 0." in result.output
    assert len(captured) == 1


def test_print_config_prints_the_resolved_options_without_training(tmp_path, captured):
    config_file = _yaml(tmp_path, "store: s\nstudent: t\noutput: o\nloss: {jsd: 0.7, ce: 0.3}\nlr: 3e-4\n")
    result = _run("--config", config_file, "max_steps=7", "--seed", "2", "--print-config")
    assert result.exit_code == 0 and not captured, result.output
    by_hand = {"store": "s", "student": "t", "output": "o", "loss": ["jsd=0.7", "ce=0.3"], "lr": 3e-4, "max_steps": 7,
               "seed": 2}
    assert yaml.safe_load(result.output) == {**asdict(TrainConfig(store="s", student="t", output="o")), **by_hand}


def test_help_explains_config_files():
    result = _run("--help")
    assert result.exit_code == 0
    for text in ("[KEY=VALUE]... | COMMAND", "--config FILE", "student-train --config examples/kd-topk-tail.yaml",
                 "override the file", "OUTPUT/resolved_config.yaml"):
        assert text in result.output, text


# --- saved config, resume, examples ---------------------------------------------------------------------------------


def test_resolved_config_is_saved_as_requested(tmp_path, store, student):
    """The saved config is the file's values, then the overrides', then the command line's, and defaults elsewhere,
    as worked out here by hand; it runs again (here, resumes) through --config."""
    output = tmp_path / "run"
    config_file = _yaml(tmp_path, f"store: {store}\nstudent: {student}\noutput: {output}\nloss: {{jsd: 0.7, ce: 0.3}}\n"
                                  "jsd_beta: 0.3\nlr: 1e-2\nbatch_size: 2\nmax_steps: 5\ndevice: cpu\n"
                                  "eval_fraction: 0.2\n")
    result = _run("--config", config_file, "batch_size=4", "max_steps=2", "eval_every=2", "kd_schedule=linear_warmup:2",
                  "--seed", "3", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    by_hand = {"loss": ["jsd=0.7", "ce=0.3"], "jsd_beta": 0.3, "lr": 0.01, "batch_size": 4, "max_steps": 3,
               "device": "cpu", "eval_fraction": 0.2, "eval_every": 2, "kd_schedule": "linear_warmup:2", "seed": 3}
    expected = {**asdict(TrainConfig(store=str(store), student=str(student), output=str(output))), **by_hand}
    resolved_text = (output / "resolved_config.yaml").read_text()
    assert resolved_text.startswith("# The resolved options of this run")
    assert yaml.safe_load(resolved_text) == expected
    assert json.loads((output / "train_config.json").read_text()) == expected
    again = _run("--config", output / "resolved_config.yaml", "--resume")
    assert again.exit_code == 0, again.output


def test_resume_with_other_options_is_refused_by_name(tmp_path, store, student):
    output = tmp_path / "run"
    options = dict(store=str(store), student=str(student), output=str(output), batch_size=4, max_steps=2, lr=1e-2,
                   eval_fraction=0.2, eval_every=2, save_every=2, device="cpu")
    train(TrainConfig(**options))
    saved = (output / "train_config.json").read_text()
    with pytest.raises(ValueError, match=re.escape("changed: loss ['forward_kl=0.9', 'ce=0.1'] -> ['ce=1.0']; lr "
                                                   "0.01 -> 0.02. Resume it with its own, e.g. `student-train "
                                                   f"--config {output / 'resolved_config.yaml'} --resume`")):
        train(TrainConfig(**{**options, "lr": 2e-2, "alpha": 0.0, "resume": True}))
    result = _run("--config", output / "resolved_config.yaml", "--resume", "seed=1")
    assert result.exit_code == 2 and "changed: seed 0 -> 1" in result.output, result.output
    assert (output / "train_config.json").read_text() == saved
    # its length and how it runs may change
    evaluation = train(TrainConfig(**{**options, "max_steps": 3, "eval_every": 3, "log_every": 1, "resume": True}))
    assert evaluation["step"] == 3
    assert json.loads((output / "train_config.json").read_text())["max_steps"] == 3


def test_there_are_examples():
    assert {path.name for path in EXAMPLES} >= {"kd-topk-tail.yaml", "kd-sampled.yaml", "kd-mixed-divergences.yaml",
                                                "ce-baseline.yaml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_trains(tmp_path, store, student, example):
    overrides = _short(store, student, tmp_path / "run")
    result = _run("--config", example, *overrides)
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    written = yaml.safe_load(example.read_text())
    overridden = {item.partition("=")[0] for item in overrides}
    expected_loss = TrainConfig(store="s", student="t", output="o", loss=written["loss"]).loss
    assert resolved["loss"] == expected_loss
    for key, value in written.items():
        if key not in overridden and key != "loss":
            assert resolved[key] == value, key
    assert (tmp_path / "run" / "final_metrics.json").exists()
