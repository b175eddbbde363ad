"""Zero-shot runs: the base model (the adapter's ``B = 0``) evaluated as a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro
import torch

from ..data import get_task
from ..models import BayesianLoRAModel
from .common import LoadedRun, build_for, rebuild, write_config
from .config import RunConfig
from .folder import RunFolder
from .svi import evaluate_loaded

__all__ = ["load_zero_shot_run", "zero_shot"]


class BaseModelGuide:
    """The adapter's initial point as a point guide: with ``B = 0`` the network is the base model."""

    def __init__(self, model: BayesianLoRAModel) -> None:
        self.model = model

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.model.point_values()


def zero_shot(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
              cache: str | None = None) -> dict[str, Any]:
    """Evaluate the base model (LoRA ``B = 0``, i.e. no adapter) on ``cfg.task``'s test split."""
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    folder = RunFolder(run_dir, overwrite=overwrite, inputs=(cfg.model.name, cfg.task))
    try:
        pyro.clear_param_store()
        model, tok = build_for(cfg, task, None, cache)
        with folder as out:
            write_config(out, "zero-shot", cfg, state="running")
            metrics, _ = evaluate_loaded(LoadedRun(model, BaseModelGuide(model), tok, cfg, task, out), task,
                                         samples=0, progress=progress)
            write_config(out, "zero-shot", cfg, state="finished")
    finally:
        folder.release()
    return {f"{task.name}/test": metrics.as_dict()}


def load_zero_shot_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun:
    """A zero-shot run's base model, as a run with a point guide (for evaluation elsewhere)."""
    run_dir = Path(run_dir)
    cfg, task, model, tok = rebuild(run_dir, device, cache)
    return LoadedRun(model, BaseModelGuide(model), tok, cfg, task, run_dir)
