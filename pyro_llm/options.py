"""Configuration fields that describe themselves: each field's default, help and command-line name
are written once, where the field is declared (as peft's ``LoraConfig`` keeps its help in field
metadata), and the command line generates its options from them (:mod:`pyro_llm.cli.options`).

    @dataclass
    class OptimConfig:
        lr: float = option(1e-4, "AdamW learning rate of the means and B.")
        seed: int = option(0, "Seed of every random draw.", flag="--seed")
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any, Callable, Iterable

__all__ = ["option", "option_meta"]

_KEY = "pyro_llm"


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None,
           choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True,
           default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field with its documentation.

    :param help: one sentence a user reads in ``--help`` and in the API reference.
    :param flag: the command-line name (default ``--<field-name>`` with dashes).
    :param choices: the allowed values, or a callable listing them (a registry that plugins extend);
        the configuration object itself checks them, the command line only lists them.
    :param parse: turns the command-line string into the field's value (e.g. comma-separated lists).
    :param cli: ``False`` for fields only the Python API sets.
    """
    meta = {_KEY: {"help": help, "flag": flag, "choices": choices, "parse": parse, "cli": cli}}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_meta(f: Field) -> dict[str, Any] | None:
    """The documentation :func:`option` attached to a dataclass field (``None`` for a plain field)."""
    return f.metadata.get(_KEY)
