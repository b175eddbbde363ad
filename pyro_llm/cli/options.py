"""Command-line options generated from the configuration classes' field metadata
(:func:`pyro_llm.options.option`): a field's flag, default, help and choices are written once, on
the field, and an option's value goes back to the field it came from by its parameter name,
``<section>__<field>``."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Callable, Iterable, Mapping

import click

from ..options import option_meta

__all__ = ["config_options", "config_values", "nested_values", "param_name"]

SEP = "__"


def param_name(section: str, name: str) -> str:
    """The click parameter that carries field ``name`` of ``section`` (``""``: a top-level field)."""
    return f"{section}{SEP}{name}" if section else name


class _Named(click.ParamType):
    """A name from a registry that plugins extend (or ``package.module:Attribute``): listed in the
    help, checked by the configuration object, once."""

    name = "name"

    def __init__(self, choices: Callable[[], Iterable[str]]) -> None:
        self.choices = choices

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(self.choices()) + "]"


class _Parsed(click.ParamType):
    """A string turned into the field's value by the field's own ``parse``."""

    name = "text"

    def __init__(self, parse: Callable[[str], Any]) -> None:
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _type(annotation: str, meta: dict[str, Any]) -> Any:
    if meta["parse"] is not None:
        return _Parsed(meta["parse"])
    choices = meta["choices"]
    if callable(choices):
        return _Named(choices)
    if choices is not None:
        return click.Choice(list(choices))
    base = annotation.replace(" ", "").split("|")[0]
    return {"int": click.INT, "float": click.FLOAT, "str": click.STRING}.get(base, click.STRING)


def config_options(section: str, cls: type, *, only: Iterable[str] | None = None,
                   exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> Callable[[Any], Any]:
    """A decorator adding one option per documented field of dataclass ``cls`` (those in ``only``,
    none in ``exclude``), with the field's own default or the command's (``defaults``: a command
    whose recipe differs, e.g. ``compare``'s); the parameters are named by :func:`param_name`."""
    overrides = dict(defaults or {})
    wanted = None if only is None else set(only)
    skip = set(exclude)

    def decorate(fn: Any) -> Any:
        for f in reversed(fields(cls)):
            meta = option_meta(f)
            if meta is None or not meta["cli"] or f.name in skip or (wanted is not None and f.name not in wanted):
                continue
            flag = meta["flag"] or f"--{f.name.replace('_', '-')}"
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            default = overrides.get(f.name, default)
            kwargs: dict[str, Any] = {"default": default, "help": meta["help"]}
            annotation = str(f.type)
            if annotation.startswith("bool"):
                if "/" not in flag:
                    flag = f"{flag}/--no-{flag[2:]}"
                kwargs["show_default"] = default is not None
            else:
                kwargs["type"] = _type(annotation, meta)
                if isinstance(default, tuple):  # shown as the command line writes it
                    kwargs["show_default"] = ",".join(map(str, default))
            fn = click.option(flag, param_name(section, f.name), **kwargs)(fn)
        return fn

    return decorate


def nested_values(values: dict[str, Any]) -> dict[str, Any]:
    """The click parameters named by :func:`param_name` as nested sections; others are left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, sep, name = key.partition(SEP)
        if sep:
            out.setdefault(section, {})[name] = value
    return out


def config_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The values of a command's parameters that belong to configuration ``cls``: its top-level
    fields by their own names, its sections' fields nested (:func:`nested_values`)."""
    top = {f.name: values[f.name] for f in fields(cls) if f.name in values}
    return {**top, **nested_values(values)}
