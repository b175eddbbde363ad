"""Zero-shot runs: the base model (the adapter's ``B = 0``) evaluated as a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from ..data import EncodedDataset, get_task
from ..evaluation import predict_proba
from ..models import BayesianLoRAModel
from .common import LoadedRun, build_for, evaluation_limit, rebuild, score, write_config
from .config import ZeroShotConfig
from .folder import RunFolder

__all__ = ["load_zero_shot_run", "zero_shot", "zero_shot_predictor"]


class BaseModelGuide:
    """The adapter's initial point as a point guide: with ``B = 0`` the network is the base model."""

    def __init__(self, model: BayesianLoRAModel) -> None:
        self.model = model

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.model.point_values()


def zero_shot_predictor(run: LoadedRun, *, progress: bool = True) -> Callable[[EncodedDataset], torch.Tensor]:
    """The base model's predictive as ``predict(data) -> probs`` (one deterministic pass)."""
    return lambda data: predict_proba(run.model, run.guide, data, num_samples=0, batch_size=run.config.eval.batch_size,
                                      progress=progress)


def zero_shot(cfg: ZeroShotConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
              cache: str | None = None) -> dict[str, Any]:
    """Evaluate the base model (LoRA ``B = 0``, i.e. no adapter) on ``cfg.task``'s test split."""
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    folder = RunFolder(run_dir, overwrite=overwrite, inputs=(cfg.model.name, cfg.task))
    try:
        pyro.clear_param_store()
        model, tok = build_for(cfg, task, None, cache)
        with folder as out:
            write_config(out, cfg, state="running")
            run = LoadedRun(model, BaseModelGuide(model), tok, cfg, task, out)
            metrics, _, _ = score(run, task, "test", evaluation_limit(cfg, None),
                                  zero_shot_predictor(run, progress=progress), extra={"samples": 0, "seed": 0})
            write_config(out, cfg, state="finished")
    finally:
        folder.release()
    return {f"{task.name}/test": metrics.as_dict()}


def load_zero_shot_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun:
    """A zero-shot run's base model, as a run with a point guide (for evaluation elsewhere)."""
    run_dir = Path(run_dir)
    cfg, task, model, tok = rebuild(run_dir, device, cache)
    return LoadedRun(model, BaseModelGuide(model), tok, cfg, task, run_dir)
