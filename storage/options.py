"""Command-line options declared once, as the fields of a command's config dataclass.

A field declared with `option(default, help=...)` carries its help text and how click spells it. From the fields,
`storage.option_cli.click_options(Config)` gives a command one click option per field (or a positional argument),
plus `--config FILE` (YAML), `--print-config` and trailing KEY=VALUE overrides; inside the command,
`load_config(Config, params)` resolves them (`resolve_options` here) and builds the config.
Precedence: the command line > KEY=VALUE > the file > the field's default. The keys of a
file and their types are the fields and their annotations, and `config_yaml` writes a config back as such a file, so
a new field is a new option and key with nothing to add here. The commands of both phases are made this way; their
config classes check the values in `__post_init__`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

Config = TypeVar("Config")
OPTION = "option"  # the metadata key of a field's OptionSpec
COMMAND_LINE = "on the command line"  # the source of an option given there


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptionSpec:
    """How the command line spells a field.

    Attributes:
        help: the one description of the option, shown by --help.
        flag: the option's name; None is the field's with - for _ (`--seq-len`). An older name keeps working this way
            (`flag="--samples"` for `num_draws`). A bool field is a flag: `--x` when it defaults to False,
            `--x/--no-x` when to True.
        metavar: the value's placeholder in --help.
        choices: the values allowed, on the command line and in files.
        type: a click type where the annotation gives none (int, float, else text).
        parse: turns the command-line text (and a scalar in a file, as that text) into the field's value: "8,16,-1" ->
            (8, 16, -1).
        multiple: a repeated option, each giving one item of a list.
        argument: a positional argument instead of an option.
        internal: neither option nor key: the field keeps its default.
        show_default: show the default in --help.
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    type: click.ParamType | None = None
    parse: Callable[[str], Any] | None = None
    multiple: bool = False
    argument: bool = False
    internal: bool = False
    show_default: bool = True


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **spec: Any) -> Any:
    """A dataclass field that is also a command-line option and a key of config files; `spec` as in OptionSpec.
    Without `default` (or `default_factory`, for a mutable one) the option is required."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={OPTION: OptionSpec(help=help, **spec)})


def spec_of(field: dataclasses.Field) -> OptionSpec:
    return field.metadata[OPTION]


def flag_of(field: dataclasses.Field) -> str:
    """How messages and --help name a field: its flag (`--seq-len`), or its argument's name (STORE)."""
    spec = spec_of(field)
    if spec.argument:
        return field.name.upper()
    return spec.flag or "--" + field.name.replace("_", "-")


def option_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of `config_class` that are options: those `__init__` takes, but the internal ones. The required
    ones come first, then the others in declaration order (where the option groups a config inherits come first)."""
    fields = [field for field in dataclasses.fields(config_class) if field.init]
    for field in fields:
        assert OPTION in field.metadata, f"{config_class.__name__}.{field.name}: declare it with option(help=...)"
    return sorted((field for field in fields if not spec_of(field).internal), key=lambda field: not is_required(field))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that 3e-4 is a float (as in YAML 1.2) rather than the string YAML 1.1 makes it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+.0123456789"))


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, one key a line and lists on theirs: `loss: [jsd=0.9, ce=0.1]`."""


_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items,
                                                                               flow_style=True))


def resolve_options(config_class: type, config_file: str | None, overrides: list[str], command_line: dict,
                    readers: Mapping[str, Callable] | None = None) -> tuple[dict, dict]:
    """Every option of `config_class` with its value by precedence, and where each given one was set.

    Args:
        config_file: a YAML mapping of field names to values, or None.
        overrides: "KEY=VALUE" each, VALUE read as YAML: `lr=3e-4`, `loss=[jsd=0.9,ce=0.1]`, `eval_store=` (null).
        command_line: the options given on the command line, as the fields take them.
        readers: per key, a function turning a file's or override's value into one the field takes.

    Returns:
        (values, sources): the keyword arguments of `config_class` (None for a required field nobody gave), and for
        each option given, "in FILE", "by KEY=VALUE" or COMMAND_LINE (for `with_sources`).

    Raises:
        ValueError: a file that is not a YAML mapping, an override without "=", an unknown key or a value of the
            wrong type.
    """
    values = {field.name: field_default(field) for field in option_fields(config_class)}
    sources = {}
    if config_file:
        for key, value in check_values(config_class, _read_yaml(config_file), f"--config {config_file}",
                                       readers).items():
            values[key], sources[key] = value, f"in {config_file}"
    for item in overrides:
        key, value = _read_override(item)
        values[key], sources[key] = check_values(config_class, {key: value}, item, readers)[key], f"by {item}"
    return values | command_line, sources | dict.fromkeys(command_line, COMMAND_LINE)


def check_values(config_class: type, values: Mapping, source: str,
                 readers: Mapping[str, Callable] | None = None) -> dict:
    """`values` as the fields of `config_class` take them: read by `readers`, or by the field's `parse` if a scalar
    (as its command-line text); an int as a float where a float is expected, a list as a tuple where a tuple is.

    Raises:
        ValueError: unknown keys, each with the closest valid ones; a value of another type than its field's, or
            not one of its choices.
    """
    fields = {field.name: field for field in option_fields(config_class)}
    unknown = [str(key) for key in values if key not in fields]
    if unknown:
        described = ", ".join(f"{key} (did you mean {' or '.join(close)}?)" if close else key
                              for key in unknown for close in [difflib.get_close_matches(key, list(fields), n=3)])
        raise ValueError(f"{source}: unknown option(s) {described}; the options are {', '.join(fields)}.")
    hints, checked = typing.get_type_hints(config_class), {}
    for key, value in values.items():
        spec = spec_of(fields[key])
        given = readers[key](value) if readers and key in readers else value
        try:
            if spec.parse and isinstance(given, str | int | float) and not isinstance(given, bool):
                given = spec.parse(str(given))  # a scalar as its command-line text: hidden_layers: -1
            checked[key] = _conform(given, hints[key])
        except TypeError:
            found = "null" if value is None else f"{type(value).__name__} {value!r}"
            raise ValueError(f"{source}: {key} must be {_describe(hints[key])}, got {found}.") from None
        except ValueError as exc:  # from `parse`
            raise ValueError(f"{source}: {exc}") from None
        if spec.choices and checked[key] is not None and checked[key] not in spec.choices:
            raise ValueError(f"{source}: {key} must be one of {', '.join(spec.choices)}, got {checked[key]!r}.")
    return checked


def config_values(config) -> dict:
    """The options of a config by field, as plain YAML and JSON values (tuples as lists)."""
    return {field.name: _plain(getattr(config, field.name)) for field in option_fields(type(config))}


def config_yaml(config) -> str:
    """The options of a config as a YAML mapping, which `--config` reads back into the same config."""
    return yaml.dump(config_values(config), Dumper=_Dumper, sort_keys=False, width=120)


def with_sources(message: str, sources: Mapping[str, str]) -> str:
    """`message`, an error naming options (as --max-steps or max_steps), with where a file or an override set them,
    e.g. "... (max_steps set in run.yaml)"."""
    named = [name for name, source in sources.items() if source != COMMAND_LINE
             and re.search(rf"(?<![\w-])(--{name.replace('_', '-')}{'|' + name if '_' in name else ''})(?![\w-])",
                           message)]
    return f"{message} ({', '.join(f'{name} set {sources[name]}' for name in named)})" if named else message


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


def _read_override(item: str) -> tuple[str, Any]:
    key, equals, text = item.partition("=")
    if not equals or not key:
        raise ValueError(f"{item!r}: expected an option or KEY=VALUE, e.g. lr=3e-4 or loss=[jsd=0.9,ce=0.1].")
    try:
        return key, yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{item}: the value is not YAML ({exc.problem}); quote it, e.g. {key}='...'.") from None


def _conform(value, hint):
    """`value` as type `hint` (an int as a float where a float is expected, a list as a tuple), or TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            with contextlib.suppress(TypeError):
                return _conform(value, arm)
        raise TypeError(hint)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(hint)
        items = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise TypeError(hint)
        return origin(_conform(item, arm) for item, arm in zip(value, items, strict=True))
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
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        return f"list of {_describe(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} {_describe(args[0])}"
    return "null" if hint is type(None) else hint.__name__


def _plain(value):
    return [_plain(item) for item in value] if isinstance(value, tuple | list) else value


def is_tuple_hint(hint) -> bool:
    """Whether a field's annotation is a tuple (a positional argument of it takes the rest of the arguments)."""
    return typing.get_origin(hint) is tuple


def is_required(field: dataclasses.Field) -> bool:
    """Whether a field has no default: its option must be given somewhere."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def field_default(field: dataclasses.Field):
    """A field's default value (None for a required field)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default
