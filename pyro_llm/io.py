"""Atomic file writes and safe loading.

Every file pyro-llm writes goes to a temporary sibling first and is renamed into place, so a
run killed at any moment leaves either the old file or the new one, never half of either.
Nothing here unpickles code: tensors travel as safetensors, and the only ``torch.load`` uses
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "CorruptFileError",
    "FileWriteError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_save_tensors",
    "atomic_torch_save",
    "load_tensors",
    "read_json",
    "safe_torch_load",
    "replace_dir",
]


class CorruptFileError(RuntimeError):
    """A file pyro-llm wrote cannot be read back (truncated, edited, or not ours)."""


class FileWriteError(OSError):
    """Writing a file failed (a full disk, a file-size limit, a permission): the message names the
    file, and nothing half-written is left in its place."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``path`` (``.<name>.XXXX.tmp<suffix>``) to write, renamed onto ``path``
    when the block succeeds and removed when it fails. The file gets the permissions the user's
    umask gives a new file (not ``mkstemp``'s 0600), and any failure to write is a
    :class:`FileWriteError` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except FileWriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:  # torch's full-disk error names no file
        raise FileWriteError(f"could not write {path}: {' '.join(str(err).split())[:300]}") from err
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


#: safetensors metadata key of the names stored once for another (JSON ``{alias: stored name}``)
ALIASES_KEY = "pyro_llm.aliases"


def atomic_save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save a flat name -> tensor mapping as safetensors, atomically. A tensor given under several
    names (one K-FAC factor that two sites share) is stored once, the other names recorded as
    aliases in the metadata, which :func:`load_tensors` restores as one shared tensor."""
    stored, aliases = _unshared(tensors)
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(dict(sorted(stored.items())), str(tmp), metadata=dict(sorted(meta.items())) or None)
        _sort_header(tmp)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys (and metadata keys) in sorted order: the library
    writes metadata in hash order, so identical runs would otherwise differ in bytes. The header
    keeps its length (the same keys, reordered), so no tensor moves."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def _unshared(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(stored, aliases)``: the tensors on the CPU, each owning its whole storage and sharing it
    with no other name, as safetensors requires (factors that are slices of one batched
    decomposition are copied), and the names whose tensor is exactly one stored earlier."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        identity = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    value.stride(), value.dtype)
        if value.numel() and identity in first:
            aliases[name] = first[identity]
            continue
        first[identity] = name
        t = value.detach().to("cpu")
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        if not whole or (t.numel() and t.untyped_storage().data_ptr() in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out, aliases


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (aliased names as one shared tensor), turning any parse failure into
    :class:`CorruptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({err})") from err
    return tensors


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` of plain containers of tensors and numbers (optimiser states), atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(..., weights_only=True)``: tensors and plain containers only, never code. A file
    that holds anything else is refused (torch's hint to pass ``weights_only=False`` is not passed
    on: following it would run whatever code the file carries)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CorruptFileError(f"{path} holds objects other than tensors and plain containers; refused, since "
                               "loading it could run code (pyro-llm never writes such a file)") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path} is not a readable tensor file ({err})") from err


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, non-UTF-8 or malformed file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{what} {path} is not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                               f"{err.msg})") from err


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory onto ``target``.

    The old target is first renamed to ``<target>.old`` and removed only after the new one is in
    place, so an interruption at any point leaves one complete copy (see
    :func:`pyro_llm.infer.checkpoint.find_checkpoint`).
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)
