"""The one record type every task produces."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Example", "LETTERS"]

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    """One labelled example.

    For multiple-choice tasks ``text`` is the whole prompt ending in ``Answer:`` and ``label`` is
    the index of the correct letter; ``num_choices`` may be below the task's class count (some
    ARC questions have 3 choices), the missing letters are masked out of the likelihood. For
    encoder classification ``text``/``text_pair`` are the two input segments. For cloze tasks
    (choices scored by their likelihood) ``text`` is the context and ``choices`` the continuations,
    each starting with its separating space.
    """

    text: str
    label: int
    num_choices: int
    text_pair: str | None = None
    uid: str = ""
    choices: tuple[str, ...] = ()
