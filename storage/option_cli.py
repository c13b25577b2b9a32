"""The click side of `storage.options`: a command's options, `--config`, `--print-config` and KEY=VALUE overrides
from the fields of its config dataclass, and the config built from what the command line gave."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from storage.options import (
    Config,
    config_yaml,
    field_default,
    flag_of,
    is_required,
    is_tuple_hint,
    option_fields,
    resolve_options,
    spec_of,
    with_sources,
)

CONFIG_FILE, PRINT_CONFIG, POSITIONAL = "config_file", "print_config", "positional"  # the generic click parameters
_OVERRIDE = re.compile(r"^[\w-]+=")  # KEY=VALUE, told apart from a positional argument (a path, a store)


def click_options(config_class: type, *, positional: bool = True) -> Callable:
    """A decorator giving a click command an option per field of `config_class`, `--config` and `--print-config`; and,
    unless `positional` is False (a group, whose positional arguments name its commands), one catch-all argument for
    the argument fields and the KEY=VALUE overrides, which `load_options` tells apart."""
    hints = typing.get_type_hints(config_class)
    fields = option_fields(config_class)
    params = [_click_option(field, hints[field.name]) for field in fields if not spec_of(field).argument]
    params += [
        click.option("--config", CONFIG_FILE, type=click.Path(exists=True, dir_okay=False),
                     help="A YAML file of these options, each named with _ for - (as --print-config writes them). "
                          "KEY=VALUE arguments (VALUE read as YAML) override it, and options given here override "
                          "both."),
        click.option("--print-config", PRINT_CONFIG, is_flag=True,
                     help="Print the resolved options as YAML, for --config, and exit."),
    ]
    if positional:
        names = [flag_of(field) + ("..." if is_tuple_hint(hints[field.name]) else "")
                 for field in fields if spec_of(field).argument]
        params.insert(0, click.argument(POSITIONAL, nargs=-1, metavar=" ".join([*names, "[KEY=VALUE]..."])))

    def decorate(function: Callable) -> Callable:
        for param in reversed(params):
            function = param(function)
        return function

    return decorate


class _FieldOption(click.Option):
    """A field's option: --help marks a field without default as required, though --config or KEY=VALUE may give it
    (`make_config` checks that something did)."""

    def __init__(self, *args, shown_required: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown_required = shown_required

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if self.shown_required:
            extra["required"] = "required"
        return extra


def _click_option(field: dataclasses.Field, hint) -> Callable:
    spec, default, flag = spec_of(field), field_default(field), flag_of(field)
    settings = {"help": spec.help, "show_default": spec.show_default, "metavar": spec.metavar, "cls": _FieldOption,
                "shown_required": is_required(field)}
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}" if default else flag, field.name, is_flag=True, default=default,
                            **settings)
    if default not in (None, (), []):  # a sequence is shown as its command-line text
        settings["default"] = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
    first = next(arm for arm in typing.get_args(hint) or (hint,) if arm is not type(None))
    click_type = {int: click.INT, float: click.FLOAT}.get(first, click.STRING) if spec.parse is None else click.STRING
    click_type = spec.type or (click.Choice(spec.choices) if spec.choices else click_type)
    return click.option(flag, field.name, type=click_type, multiple=spec.multiple, **settings)


def load_options(config_class: type, params: Mapping[str, Any],
                 readers: Mapping[str, Callable] | None = None) -> tuple[dict, dict]:
    """`resolve_options` for the running command: the options given in click's `params` (its callback's keyword
    arguments), its --config file and the KEY=VALUE overrides (in `params`, or for a group the context's extra
    arguments). Raises click.UsageError where `resolve_options` raises ValueError, and for an argument too many."""
    ctx = click.get_current_context()
    items = [*params.get(POSITIONAL, ()), *ctx.args]
    try:
        given = {field.name: _from_text(field, params[field.name]) for field in option_fields(config_class)
                 if ctx.get_parameter_source(field.name) is click.core.ParameterSource.COMMANDLINE}
        given |= _arguments(config_class, [item for item in items if not _OVERRIDE.match(item)])
        overrides = [item for item in items if _OVERRIDE.match(item)]
        return resolve_options(config_class, params.get(CONFIG_FILE), overrides, given, readers)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def make_config(config_class: type[Config], values: dict, sources: dict) -> Config:
    """The running command's config of its resolved options; with --print-config, print it as YAML and exit.

    Raises:
        click.UsageError: a required option nobody gave, or a value the config refuses (with where it was set).
    """
    ctx = click.get_current_context()
    missing = [flag_of(field) for field in option_fields(config_class)
               if is_required(field) and values[field.name] is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see {ctx.command_path} --help).")
    try:
        config = config_class(**values)
    except ValueError as exc:
        raise click.UsageError(with_sources(str(exc), sources)) from None
    if ctx.params.get(PRINT_CONFIG):
        click.echo(config_yaml(config), nl=False)
        ctx.exit()
    return config


def load_config(config_class: type[Config], params: Mapping[str, Any]) -> Config:
    """`make_config` of `load_options`, for a command with nothing to do between."""
    return make_config(config_class, *load_options(config_class, params))


def _from_text(field: dataclasses.Field, value):
    """A command-line value as the field takes it: parsed, or a repeated option's items as a list."""
    spec = spec_of(field)
    if spec.multiple:
        return list(value)
    return spec.parse(value) if spec.parse else value


def _arguments(config_class: type, items: list[str]) -> dict:
    """The positional arguments as the values of the argument fields, in order; a tuple field takes the rest."""
    hints, values = typing.get_type_hints(config_class), {}
    for field in option_fields(config_class):
        if spec_of(field).argument and items:
            if is_tuple_hint(hints[field.name]):
                values[field.name], items = tuple(items), []
            else:
                values[field.name], items = items[0], items[1:]
    if items:
        raise ValueError(f"{items[0]!r}: expected an option or KEY=VALUE (KEY an option's name with _ for -, VALUE "
                         "read as YAML).")
    return values
