"""Zero-shot runs: the base model (the adapter's ``B = 0``) evaluated as a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro
import torch

from ..data import get_task
from .common import LoadedRun, build_for, write_config
from .config import GuideConfig, RunConfig
from .folder import RunFolder
from .svi import evaluate_loaded

__all__ = ["zero_shot"]


def zero_shot(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
              cache: str | None = None) -> dict[str, Any]:
    """Evaluate the base model (LoRA ``B = 0``, i.e. no adapter) on ``cfg.task``'s test split."""
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    folder = RunFolder(run_dir, overwrite=overwrite, inputs=(cfg.model.name, cfg.task))
    cfg.guide = GuideConfig("map")
    pyro.clear_param_store()
    model, tok = build_for(cfg, task, None, cache)

    class _Base:  # the adapter's initial point: B = 0, so the network is the base model
        def median(self, **_: Any) -> dict[str, torch.Tensor]:
            return model.point_values()

    with folder as out:
        write_config(out, "zero-shot", cfg, state="running")
        metrics, _ = evaluate_loaded(LoadedRun(model, _Base(), tok, cfg, task, out), task, samples=0,
                                     progress=progress)
        write_config(out, "zero-shot", cfg, state="finished")
    return {f"{task.name}/test": metrics.as_dict()}


