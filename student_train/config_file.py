"""Config files of `student-train`: a YAML file of `TrainConfig`'s fields and KEY=VALUE overrides, checked against
the dataclass before its own checks; the resolved config saved beside a run's outputs and compared with the saved one
when the run resumes.

Precedence: options given on the command line > KEY=VALUE overrides > the file > TrainConfig's defaults. The valid
keys and their types are TrainConfig's fields and annotations, so a new field is a new key with nothing to add here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path

import yaml

from storage.fs import Location
from student_train.config import TrainConfig

RESOLVED_CONFIG = "resolved_config.yaml"  # for people, and for `student-train --config` to run it again
RESUME_CONFIG = "train_config.json"  # what --resume compares the new options with
# What a resumed run may change: how long it trains and how it runs, logs and checkpoints, not what it learns.
# More steps (or epochs) stretch the rest of the learning-rate schedule to the new end.
CHANGEABLE_ON_RESUME = ("resume", "max_steps", "epochs", "device", "num_workers", "verify", "chunk_positions",
                        "fused_ce", "loss_impl", "eval_every", "save_every", "log_every", "keep_checkpoints")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that 3e-4 is a float (as in YAML 1.2) rather than the string YAML 1.1 makes it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+.0123456789"))


def resolve_options(config_file: str | None, overrides: list[str], command_line: dict) -> tuple[dict, dict]:
    """Every field of TrainConfig with its value by precedence, and where the file or an override set one.

    Args:
        config_file: a YAML mapping of field names to values, or None.
        overrides: "KEY=VALUE" each, VALUE read as YAML: `lr=3e-4`, `loss=[jsd=0.9,ce=0.1]`, `eval_store=` (null).
        command_line: the options given on the command line, typed by click.

    Returns:
        (options, sources): options for `TrainConfig(**options)` (None for a required field nobody gave); sources
        says, for each field the file or an override set, "in FILE" or "by KEY=VALUE", for `with_sources`.

    Raises:
        ValueError: a file that is not a YAML mapping, an override without "=", an unknown key or a value of the
            wrong type.
    """
    options = {field.name: _default(field) for field in _fields()}
    sources = {}
    if config_file:
        for key, value in check_values(_read_yaml(config_file), f"--config {config_file}").items():
            options[key], sources[key] = value, f"in {config_file}"
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise ValueError(f"{item!r}: expected an option or KEY=VALUE, e.g. lr=3e-4 or loss=[jsd=0.9,ce=0.1].")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{item}: the value is not YAML ({exc.problem}); quote it, e.g. {key}='...'.") from None
        options[key], sources[key] = check_values({key: value}, item)[key], f"by {item}"
    for key in command_line:
        sources.pop(key, None)
    return options | command_line, sources


def check_values(values: dict, source: str) -> dict:
    """`values` as TrainConfig's fields take them: an int where a float is expected becomes a float, and `loss` may
    be given as a mapping {NAME: WEIGHT} or a list of one-entry mappings as well as of "NAME=WEIGHT" terms.

    Raises:
        ValueError: unknown keys, each with the closest valid ones, or a value of another type than its field's.
    """
    hints = typing.get_type_hints(TrainConfig)
    names = [field.name for field in _fields()]
    unknown = [str(key) for key in values if key not in names]
    if unknown:
        described = ", ".join(f"{key} (did you mean {' or '.join(close)}?)" if close else key
                              for key in unknown for close in [difflib.get_close_matches(key, names, n=3)])
        raise ValueError(f"{source}: unknown option(s) {described}; the options are {', '.join(names)}.")
    checked = {}
    for key, value in values.items():
        given = _loss_terms(value) if key == "loss" else value
        try:
            checked[key] = _conform(given, hints[key])
        except TypeError:
            found = "null" if value is None else f"{type(value).__name__} {value!r}"
            raise ValueError(f"{source}: {key} must be {_describe(hints[key])}, got {found}.") from None
    return checked


def with_sources(message: str, sources: dict) -> str:
    """`message`, an error naming options (as --max-steps or max_steps), with where the file or an override set
    them, e.g. "... (max_steps set in run.yaml)"."""
    named = [name for name in sources
             if re.search(rf"(?<![\w-])(--{name.replace('_', '-')}{'|' + name if '_' in name else ''})(?![\w-])",
                          message)]
    return f"{message} ({', '.join(f'{name} set {sources[name]}' for name in named)})" if named else message


def save_run_config(config: TrainConfig, output: Path) -> None:
    """Write the resolved config beside a run's outputs, each file atomically: RESOLVED_CONFIG (YAML, for people and
    `--config`) and RESUME_CONFIG (JSON, what `--resume` compares with)."""
    values = dataclasses.asdict(config)
    location = Location(output)
    location.write_bytes_atomic(RESUME_CONFIG, json.dumps(values, indent=1).encode())
    header = ("# The resolved options of this run, defaults included; `student-train --config THIS_FILE` runs it "
              "again\n# (with --resume, continues it).\n")
    text = yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=120)
    location.write_bytes_atomic(RESOLVED_CONFIG, (header + text).encode())


def refuse_changed_config(config: TrainConfig, output: Path) -> None:
    """Refuse to resume the run in `output` with options other than its own, but those of CHANGEABLE_ON_RESUME.

    Raises:
        ValueError: naming each changed option with its saved and its new value.
    """
    path = output / RESUME_CONFIG
    saved = dataclasses.asdict(TrainConfig(**check_values(json.loads(path.read_text()), str(path))))
    now = dataclasses.asdict(config)
    changed = [f"{name} {saved[name]!r} -> {now[name]!r}" for name in now
               if name not in CHANGEABLE_ON_RESUME and saved[name] != now[name]]
    if changed:
        raise ValueError(f"--resume: {output} was trained with other options; changed: {'; '.join(changed)}. Resume "
                         f"it with its own, e.g. `student-train --config {output / RESOLVED_CONFIG} --resume` (only "
                         f"{', '.join(CHANGEABLE_ON_RESUME[1:])} may change), or start a new --output.")


def _fields() -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(TrainConfig) if field.init]


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _read_yaml(path: str) -> dict:
    try:
        values = yaml.load(Path(path).read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML: {exc}") from None
    if values is None:  # an empty file, or only comments
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values (max_steps: 2000), got a "
                         f"{type(values).__name__}.")
    return values


def _loss_terms(value):
    """The other YAML forms of `loss` as its "NAME=WEIGHT" terms: {jsd: 0.9, ce: 0.1}, [{jsd: 0.9}, {ce: 0.1}]."""
    if isinstance(value, dict):
        return [f"{name}={weight}" for name, weight in value.items()]
    if isinstance(value, list):
        return [_loss_terms(item)[0] if isinstance(item, dict) and len(item) == 1 else item for item in value]
    return value


def _conform(value, hint):
    """`value` as type `hint` (an int as a float where a float is expected), or TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            with contextlib.suppress(TypeError):
                return _conform(value, arm)
        raise TypeError(hint)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(hint)
        return [_conform(item, args[0]) for item in value]
    if hint is float and type(value) is int:
        return float(value)
    if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):  # True is an int to Python
        return value
    raise TypeError(hint)


def _describe(hint) -> str:
    """A type as a config file's author knows it: "int or null", "list of str or str"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is list:
        return f"list of {_describe(args[0])}"
    return "null" if hint is type(None) else hint.__name__
