"""Any saved run, by the kind its ``config.json`` names: load it, evaluate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import get_task
from ..evaluation import Metrics
from .common import LoadedRun, read_config
from .laplace import LaplaceRun, load_laplace_run
from .svi import evaluate_loaded, load_svi_run

__all__ = ["evaluate", "load_run"]


def load_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun | LaplaceRun:
    """Rebuild a saved SVI or Laplace run (safetensors only)."""
    run_dir = Path(run_dir)
    kind = read_config(run_dir).get("kind")
    if kind == "laplace":
        return load_laplace_run(run_dir, device=device, cache=cache)
    if kind != "svi":
        raise ValueError(f"{run_dir} is a {kind!r} run, which has no trained weights to evaluate "
                         "(for the base model use `pyro-llm zero-shot --task ...`)")
    return load_svi_run(run_dir, device=device, cache=cache)


def evaluate(run_dir: str | Path, task: str | None = None, *, split: str = "test", samples: int | None = None,
             limit: int | None = None, device: str | None = None, progress: bool = True,
             cache: str | None = None, **kwargs: Any) -> Metrics:
    """Evaluate a saved run (SVI or Laplace) on ``task`` (default: its training task)."""
    run = load_run(run_dir, device=device, cache=cache)
    spec = get_task(task) if task else run.task
    if hasattr(run, "evaluate"):
        return run.evaluate(spec, split=split, limit=limit, progress=progress, **kwargs)
    return evaluate_loaded(run, spec, split=split, samples=samples, limit=limit, progress=progress)[0]
