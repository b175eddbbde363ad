"""Training checkpoints: written whole to a staging folder, then renamed into place.

Layout of ``<run>/checkpoint/``::

    params.safetensors   unconstrained values of every pyro.param the model and guide use
    optim.pt             optimiser and LR-scheduler state dicts (loaded with weights_only=True)
    rng.safetensors      torch CPU (and CUDA) generator states
    state.json           {"step": next step to run, "history": [...]}
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from ..io import CorruptFileError, atomic_save_tensors, atomic_torch_save, atomic_write_json, load_tensors, \
    read_json, replace_dir, safe_torch_load

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "save_params", "load_params"]


def save_params(path: Path, names: list[str], metadata: dict[str, str] | None = None) -> None:
    """Save the unconstrained values of the named params of Pyro's param store."""
    store = dict(pyro.get_param_store().named_parameters())
    atomic_save_tensors(path, {n: store[n] for n in names}, metadata)


def load_params(path: Path, names: list[str] | None = None,
                upgrade: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> list[str]:
    """Copy saved unconstrained values into the existing params of the store (in place, so
    optimisers and modules keep their references). Returns the names loaded.

    :param upgrade: maps a file written by an earlier layout to the current one (e.g.
        :meth:`~pyro_llm.guides.BLoBGuide.upgrade_saved`)."""
    saved = load_tensors(path)
    if upgrade is not None:
        saved = upgrade(saved)
    store = dict(pyro.get_param_store().named_parameters())
    wanted = names if names is not None else list(saved)
    missing = [n for n in wanted if n not in saved]
    if missing:
        raise CorruptFileError(f"{path} lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for n in wanted:
        if n not in store:
            raise KeyError(f"parameter {n!r} from {path} does not exist in this model/guide")
        if store[n].shape != saved[n].shape:
            raise CorruptFileError(f"{path}: {n} has shape {tuple(saved[n].shape)}, expected {tuple(store[n].shape)}")
        with torch.no_grad():
            store[n].copy_(saved[n].to(store[n].device, store[n].dtype))
    return wanted


def save_checkpoint(run_dir: Path, names: list[str], optim_state: dict[str, Any], step: int,
                    history: list[dict[str, float]]) -> None:
    target = run_dir / "checkpoint"
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
    try:
        save_params(staging / "params.safetensors", names)
        atomic_torch_save(staging / "optim.pt", optim_state)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        atomic_save_tensors(staging / "rng.safetensors", rng)
        atomic_write_json(staging / "state.json", {"step": step, "history": history, "params": names})
        replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint folder of a run (``checkpoint``, or ``checkpoint.old`` when a crash
    came between the two renames of :func:`~pyro_llm.io.replace_dir`)."""
    for name in ("checkpoint", "checkpoint.old"):
        path = run_dir / name
        if (path / "state.json").is_file():
            return path
    return None


def load_checkpoint(path: Path) -> tuple[int, list[dict[str, float]], list[str], dict[str, Any]]:
    """Load params (in place) and RNG state; return ``(step, history, names, optim_state)``."""
    state = read_json(path / "state.json", "checkpoint state")
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and isinstance(state.get("history"), list) and isinstance(state.get("params"), list)):
        raise CorruptFileError(f"checkpoint state {path / 'state.json'} is not one pyro-llm wrote "
                               "(it needs a step >= 0, a history and the parameter names)")
    names = load_params(path / "params.safetensors", state["params"])
    optim_state = safe_torch_load(path / "optim.pt")
    rng = load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return int(state["step"]), list(state["history"]), names, optim_state
