"""Options declared once: every command's click options are its config dataclass's fields (plus --config,
--print-config and KEY=VALUE), the flags of before are kept, and every command reads a YAML file with the same
precedence (command line > KEY=VALUE > file > default), refusing unknown keys and wrong types.

Each case goes through click's CliRunner and checks the config the command would run, captured where the command
hands it to the library, against one written here by hand.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import student_train.train
from student_train import prune_cli
from student_train.cli import main as student_main
from student_train.config import TrainConfig
from student_train.prune_cli import StudentInitConfig
from teacher_cache import BuildConfig
from teacher_cache import cli as teacher_cli
from teacher_cache.cli import main as teacher_main

# The flags each command had before its options were declared as fields (from its --help), which scripts and the
# README use: every one must still exist.
FLAGS_BEFORE = {
    "teacher-cache build": "--model --dataset --output --text-field --split --max-samples --seq-len "
                           "--allow-long-context --pack --no-pack --targets --top-k --samples --seed --hidden-layers "
                           "--hidden-dtype --batch-size --samples-per-shard --chunk-positions --device --dtype "
                           "--resume --backend --tensor-parallel-size --gpu-memory-utilization "
                           "--max-num-batched-tokens --num-workers --worker-index",
    "teacher-cache info": "--json",
    "teacher-cache inspect": "--json --plot --shards",
    "teacher-cache select": "--by --top --bottom --band --order --seed --min-tokens --held-out-fraction --output "
                            "--force",
    "teacher-cache merge": "--output --ensemble --weights --top-k --seed --resume",
    "teacher-cache verify": "--repair",
    "teacher-cache export": "--format",
    "student-train": "--store --student --output --config --loss --targets-from --top-k --online-teacher --alpha "
                     "--temperature --jsd-beta --skew-alpha --kd-schedule --feature-loss --feature-weight "
                     "--feature-layers --feature-projection --batch-size --grad-accum --lr --weight-decay "
                     "--warmup-steps --max-steps --epochs --clip-grad --precision --device --eval-fraction "
                     "--eval-store --eval-every --save-every --log-every --chunk-positions --fused-ce --loss-impl "
                     "--seed --num-workers --verify --no-verify --distributed --selection --resume "
                     "--init-from-teacher --keep-layers -v --verbose "
                     "--min-lr-fraction --keep-checkpoints",  # the two fields that had no flag
    "student-train check": "--store --student",
    "student-train eval": "--teacher --student --store --data --text-field --split --seq-len --samples "
                          "--held-out-fraction --all --output --device --dtype --batch-size --chunk-positions",
    "student-init": "--teacher --output --keep-layers --layers --layer-importance --heads --ffn --store "
                    "--calibration-samples --batch-size --device -v --verbose",
}
# Where a flag is not the field's name with - for _.
RENAMED = {"--samples": "num_draws", "--by": "key", "--all": "all_samples", "--format": "dataset_format"}


def _commands():
    """(name, click command, config class, positional arguments in order) of every command."""
    from student_train.cli import CheckOptions
    from student_train.evaluate import EvalConfig
    from teacher_cache.commands import (
        ExportOptions,
        InfoOptions,
        InspectOptions,
        MergeOptions,
        SelectOptions,
        VerifyOptions,
    )

    group = teacher_main.commands
    return [
        ("teacher-cache build", group["build"], BuildConfig, []),
        ("teacher-cache info", group["info"], InfoOptions, ["STORE"]),
        ("teacher-cache inspect", group["inspect"], InspectOptions, ["STORE"]),
        ("teacher-cache select", group["select"], SelectOptions, ["STORE"]),
        ("teacher-cache merge", group["merge"], MergeOptions, ["STORES..."]),
        ("teacher-cache verify", group["verify"], VerifyOptions, ["STORE"]),
        ("teacher-cache export", group["export"], ExportOptions, ["STORE", "OUTPUT"]),
        ("student-train", student_main, TrainConfig, None),  # a group: KEY=VALUE where commands are named
        ("student-train check", student_main.commands["check"], CheckOptions, []),
        ("student-train eval", student_main.commands["eval"], EvalConfig, []),
        ("student-init", prune_cli.main, StudentInitConfig, []),
    ]


def test_each_option_is_a_field_and_each_field_an_option():
    for name, command, config_class, arguments in _commands():
        params = command.get_params(click.Context(command, info_name=name))
        options = {param.name: param for param in params if param.param_type_name == "option"}
        fields = {field.name for field in dataclasses.fields(config_class) if field.name not in
                  {argument.rstrip(".").lower() for argument in arguments or []}}
        verbose = {"verbose"} if name in ("student-train", "student-init") else set()
        generic = {"config_file", "print_config"} | verbose
        help_option = command.get_help_option(click.Context(command, info_name=name))
        assert set(options) == fields | generic | {help_option.name}, name
        assert "--help" in help_option.opts
        for field in fields:
            flag = next((flag for flag, renamed in RENAMED.items() if renamed == field), "--" + field.replace("_", "-"))
            assert flag in options[field].opts, (name, field)
        positional = [param for param in params if param.param_type_name == "argument"]
        if arguments is None:
            assert not positional, name
        else:
            assert [param.metavar for param in positional] == [" ".join([*arguments, "[KEY=VALUE]..."])], name


def test_the_flags_of_before_are_kept():
    for name, command, _, _ in _commands():
        params = command.get_params(click.Context(command, info_name=name))
        flags = {flag for param in params for flag in [*param.opts, *param.secondary_opts]}
        assert set(FLAGS_BEFORE[name].split()) <= flags, (name, set(FLAGS_BEFORE[name].split()) - flags)


# --- build -----------------------------------------------------------------------------------------------------


@pytest.fixture
def built(monkeypatch) -> list[BuildConfig]:
    """The configs `teacher-cache build` would build, without a teacher; no launcher's environment."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                 "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    manifest = types.SimpleNamespace(worker=0, num_samples=0, num_tokens=0, shards=[])
    monkeypatch.setattr(teacher_cli, "build_cache", lambda config: seen.append(config) or manifest)
    return seen


def _yaml(tmp_path: Path, text: str, name: str = "options.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _build(*args) -> object:
    """`teacher-cache build` through CliRunner (which names the program `main`)."""
    return CliRunner().invoke(teacher_main, ["build", *map(str, args)])


REQUIRED = ["--model", "m", "--dataset", "d", "--output", "o"]


def test_build_reads_back_what_it_prints(tmp_path, built):
    printed = _build(*REQUIRED, "--targets", "hybrid", "--hidden-layers", "8,-1", "--samples", "20", "--no-pack",
                     "seq_len=512", "--print-config")
    assert printed.exit_code == 0 and not built, printed.output
    values = yaml.safe_load(printed.output)
    assert (values["targets"], values["hidden_layers"], values["num_draws"], values["seq_len"], values["pack"],
            values["samples_per_shard"]) == (["hybrid"], [8, -1], 20, 512, False, (1 << 20) // 512)
    result = _build("--config", _yaml(tmp_path, printed.output))
    assert result.exit_code == 0, result.output
    assert built == [BuildConfig(model="m", dataset="d", output="o", targets=("hybrid",), hidden_layers=(8, -1),
                                 num_draws=20, pack=False, seq_len=512)]


def test_build_precedence_and_the_text_forms_in_a_file(tmp_path, built):
    config_file = _yaml(tmp_path, "model: m\ndataset: d\noutput: o\nseq_len: 128\ntop_k: 8\nseed: 1\n"
                                  "hidden_layers: -1\ntargets: topk\n")
    result = _build("--config", config_file, "top_k=16", "seed=2", "--seed", "3")
    assert result.exit_code == 0, result.output
    # seq_len from the file, top_k from the override, seed from the command line; the file's text forms parsed
    assert built == [BuildConfig(model="m", dataset="d", output="o", seq_len=128, top_k=16, seed=3, hidden_layers=(-1,),
                                 targets=("topk",))]


def test_build_workers_come_from_the_environment_unless_given(tmp_path, built, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert _build(*REQUIRED).exit_code == 0
    assert _build("--config", _yaml(tmp_path, "num_workers: 2\nworker_index: 1\n"), *REQUIRED).exit_code == 0
    assert [(config.num_workers, config.worker_index) for config in built] == [(4, 3), (2, 1)]


@pytest.mark.parametrize("text, args, message", [
    ("seq_lenn: 3\n", [], "--config {file}: unknown option(s) seq_lenn (did you mean seq_len?); the options are "
                          "model, dataset, output"),
    ("", ["samples=3"], "samples=3: unknown option(s) samples (did you mean "),
    ("top_k: x\n", [], "--config {file}: top_k must be int, got str 'x'."),
    ("", ["max_samples=1.5"], "max_samples=1.5: max_samples must be int or null, got float 1.5."),
    ("hidden_layers: [a]\n", [], "hidden_layers must be list of int, got list ['a']."),
    ("hidden_layers: 8,x\n", [], "--config {file}: --hidden-layers: expected integers separated by commas"),
    ("backend: vlm\n", [], "backend must be one of transformers, vllm, got 'vlm'."),
    ("", ["pack=maybe"], "pack must be bool, got str 'maybe'."),
    ("seq_len: 1\n", [], "--seq-len: must be at least 2, got 1. (seq_len set in {file})"),
])
def test_build_refuses_bad_files_and_overrides(tmp_path, built, text, args, message):
    config_file = _yaml(tmp_path, text)
    result = _build("--config", config_file, *REQUIRED, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message.format(file=config_file) in " ".join(result.output.split()), result.output
    assert not built


def test_build_names_the_missing_options(built):
    result = _build("--output", "o")
    assert result.exit_code == 2 and "missing --model, --dataset (see main build --help)" in result.output
    result = _build(*REQUIRED, "fast")
    assert result.exit_code == 2 and "'fast': expected an option or KEY=VALUE" in result.output, result.output
    assert not built


# --- the commands on stores ---------------------------------------------------------------------------------------


def _store_command(*args) -> object:
    return CliRunner().invoke(teacher_main, list(map(str, args)))


def test_store_commands_read_their_arguments_from_a_file(tmp_path):
    config_file = _yaml(tmp_path, "store: /in/the/file\njson: true\n")
    printed = _store_command("info", "--config", config_file, "--print-config")
    assert printed.exit_code == 0, printed.output
    assert yaml.safe_load(printed.output) == {"store": "/in/the/file", "json": True}
    printed = _store_command("info", "/given", "--config", config_file, "json=false", "--print-config")
    assert yaml.safe_load(printed.output) == {"store": "/given", "json": False}
    printed = _store_command("merge", "a", "b", "--config", _yaml(tmp_path, "stores: [x]\nweights: 0.7,0.3\n"),
                             "--ensemble", "--print-config")
    assert yaml.safe_load(printed.output) == {"stores": ["a", "b"], "output": None, "ensemble": True,
                                              "weights": [0.7, 0.3], "top_k": None, "seed": 0, "resume": False}
    printed = _store_command("select", "s", "--by", "nll", "band=0.5:0.9", "--output", "ids.json", "--print-config")
    assert yaml.safe_load(printed.output) == {"store": "s", "key": "nll", "top": None, "bottom": None,
                                              "band": [0.5, 0.9], "order": "shuffle", "seed": 0, "min_tokens": 1,
                                              "held_out_fraction": 0.05, "output": "ids.json", "force": False}


@pytest.mark.parametrize("args, message", [
    (["info", "a", "b"], "'b': expected an option or KEY=VALUE"),
    (["export", "a"], "missing OUTPUT (see main export --help)"),
    (["merge"], "missing STORES (see main merge --help)"),
    (["merge", "a", "b", "weights=[0.5, x]"], "weights must be list of float or null, got list [0.5, 'x']"),
    (["select", "s", "--output", "o.json", "key=entropi"], "key must be one of entropy, nll, tail_mass, top1, got "
                                                          "'entropi'"),
    (["select", "s", "--output", "o.json", "--by", "nll", "band=0.5"], "band=0.5: --band: expected LOW:HIGH"),
    (["verify", "s", "repare=true"], "unknown option(s) repare (did you mean repair?)"),
])
def test_store_commands_refuse_bad_input(args, message):
    result = _store_command(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split()), result.output


# --- student-train and student-init ---------------------------------------------------------------------------------


@pytest.fixture
def trained(monkeypatch) -> list[TrainConfig]:
    seen = []
    monkeypatch.setattr(student_train.train, "train", lambda config: seen.append(config) or {})
    return seen


def test_train_reads_back_what_it_prints(tmp_path, trained):
    args = ["--store", "s", "--student", "t", "--output", "o", "--loss", "jsd=0.7", "--loss", "ce=0.3",
            "--feature-loss", "mse", "feature_layers=2:4,4:8", "--min-lr-fraction", "0.2", "--keep-checkpoints", "3",
            "--no-verify"]
    printed = CliRunner().invoke(student_main, [*args, "--print-config"])
    assert printed.exit_code == 0 and not trained, printed.output
    assert yaml.safe_load(printed.output)["feature_layers"] == [[2, 4], [4, 8]]
    result = CliRunner().invoke(student_main, ["--config", _yaml(tmp_path, printed.output)])
    assert result.exit_code == 0, result.output
    assert trained == [TrainConfig(store="s", student="t", output="o", loss=["jsd=0.7", "ce=0.3"], feature_loss="mse",
                                   feature_layers=[[2, 4], [4, 8]], min_lr_fraction=0.2, keep_checkpoints=3,
                                   verify=False)]


def test_student_init_reads_back_what_it_prints(tmp_path, llama_dir, monkeypatch):
    seen = []
    report = {"layers": {"kept": [0], "teacher": 2, "method": "given"},
              "parameters": {"student": 1.0, "teacher": 2.0, "compression_ratio": 2.0}}
    monkeypatch.setattr(prune_cli, "prune_teacher", lambda config: seen.append(config) or report)
    args = ["--teacher", str(llama_dir), "--output", str(tmp_path / "student"), "--heads", "0.5", "--ffn", "64",
            "keep_layers=[0, -1]", "--store", "s"]
    printed = CliRunner().invoke(prune_cli.main, [*args, "--print-config"])
    assert printed.exit_code == 0 and not seen, printed.output
    assert (yaml.safe_load(printed.output)["heads"], yaml.safe_load(printed.output)["ffn"]) == (0.5, 64)
    result = CliRunner().invoke(prune_cli.main, ["--config", _yaml(tmp_path, printed.output)])
    assert result.exit_code == 0, result.output
    assert seen == [StudentInitConfig(teacher=str(llama_dir), output=str(tmp_path / "student"), heads=0.5, ffn=64,
                                      keep_layers=[0, -1], store="s")]
    result = CliRunner().invoke(prune_cli.main, [*args, "heads=true"])
    assert result.exit_code == 2 and "heads=true: heads must be int or float or null, got bool True" in result.output


@pytest.mark.parametrize("args, message", [
    (["check", "--store", "s", "student=t", "studnet=u"], "unknown option(s) studnet (did you mean student?)"),
    (["check", "--store", "s"], "missing --student (see main check --help)"),
    (["eval", "--teacher", "t", "--student", "s", "dtype=float8"], "dtype must be one of auto, float32, bfloat16, "
                                                                   "float16, got 'float8'"),
    (["eval", "--teacher", "t", "--student", "s", "--data", "x", "all_samples=sure"],
     "all_samples must be bool, got str 'sure'"),
])
def test_student_train_commands_refuse_bad_input(args, message):
    result = CliRunner().invoke(student_main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split()), result.output
