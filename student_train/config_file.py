"""Config files of `student-train`, beyond what `storage.options` does for every command (a YAML file and KEY=VALUE
overrides read into the config dataclass, checked against its fields before its own checks): the YAML forms of
`loss` and `mix`; the resolved config saved beside a run's outputs; and, when the run resumes, its comparison with
the saved one.

Precedence: options given on the command line > KEY=VALUE overrides > the file > TrainConfig's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage import options
from storage.fs import Location
from student_train.config import TrainConfig

RESOLVED_CONFIG = "resolved_config.yaml"  # for people, and for `student-train --config` to run it again
RESUME_CONFIG = "train_config.json"  # what --resume compares the new options with
# What a resumed run may change: how long it trains and how it runs, logs and checkpoints, not what it learns.
# More steps (or epochs) stretch the rest of the learning-rate schedule to the new end.
CHANGEABLE_ON_RESUME = ("resume", "max_steps", "epochs", "device", "num_workers", "verify", "chunk_positions",
                        "fused_ce", "loss_impl", "eval_every", "save_every", "log_every", "keep_checkpoints",
                        "allow_chat_template_mismatch")


def loss_terms(value):
    """The other YAML forms of `loss` (and of `mix`) as its "NAME=WEIGHT" terms: {jsd: 0.9, ce: 0.1},
    [{jsd: 0.9}, {ce: 0.1}]."""
    if isinstance(value, dict):
        return [f"{name}={weight}" for name, weight in value.items()]
    if isinstance(value, list):
        return [loss_terms(item)[0] if isinstance(item, dict) and len(item) == 1 else item for item in value]
    return value


READERS = {"loss": loss_terms, "mix": loss_terms}  # for `storage.option_cli.load_options` and `resolve_options`


def resolve_options(config_file: str | None, overrides: list[str], command_line: dict) -> tuple[dict, dict]:
    """`storage.options.resolve_options` of TrainConfig: (keyword arguments of TrainConfig, where each given option
    was set), from a YAML file, KEY=VALUE overrides and the options given on the command line.

    Raises:
        ValueError: a file that is not a YAML mapping, an override without "=", an unknown key or a value of the
            wrong type.
    """
    return options.resolve_options(TrainConfig, config_file, overrides, command_line, READERS)


def save_run_config(config: TrainConfig, output: Path) -> None:
    """Write the resolved config beside a run's outputs, each file atomically: RESOLVED_CONFIG (YAML, for people and
    `--config`) and RESUME_CONFIG (JSON, what `--resume` compares with)."""
    location = Location(output)
    location.write_bytes_atomic(RESUME_CONFIG, json.dumps(options.config_values(config), indent=1).encode())
    header = ("# The resolved options of this run, defaults included; `student-train --config THIS_FILE` runs it "
              "again\n# (with --resume, continues it).\n")
    location.write_bytes_atomic(RESOLVED_CONFIG, (header + options.config_yaml(config)).encode())


def refuse_changed_config(config: TrainConfig, output: Path) -> None:
    """Refuse to resume the run in `output` with options other than its own, but those of CHANGEABLE_ON_RESUME.

    Raises:
        ValueError: naming each changed option with its saved and its new value.
    """
    path = output / RESUME_CONFIG
    saved = options.config_values(TrainConfig(**options.check_values(TrainConfig, json.loads(path.read_text()),
                                                                     str(path))))
    now = options.config_values(config)
    changed = [f"{name} {saved[name]!r} -> {now[name]!r}" for name in now
               if name not in CHANGEABLE_ON_RESUME and saved[name] != now[name]]
    if changed:
        raise ValueError(f"--resume: {output} was trained with other options; changed: {'; '.join(changed)}. Resume "
                         f"it with its own, e.g. `student-train --config {output / RESOLVED_CONFIG} --resume` (only "
                         f"{', '.join(CHANGEABLE_ON_RESUME[1:])} may change), or start a new --output.")
