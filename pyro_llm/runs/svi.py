"""SVI runs: train a guide into a run folder, reload it, evaluate its N-sample predictive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import distributed as dist

from ..data import EncodedDataset, TaskSpec, encode_examples, get_task, load_examples
from ..evaluation import Metrics, predict_proba
from ..guides import write_back_means
from ..infer import SVITrainer, load_params, save_params
from ..io import atomic_write_json
from ..models import BayesianLoRAModel, lora_dropout_active
from .common import LoadedRun, build_for, init_distributed, load_split, prepare_run_dir, read_config, score
from .config import RunConfig
from .registry import ELBOS, GUIDES, KL_SCHEDULES, KLScheduleArgs, make_guide

__all__ = ["evaluate_loaded", "load_svi_run", "train"]


def _guide(cfg: RunConfig, model: BayesianLoRAModel) -> Any:
    return make_guide(cfg.guide, model, **cfg.guide_options)


def train(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          progress: bool = True, cache: str | None = None, evaluate_after: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and evaluate on the task's test split; returns the metrics."""
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    rank = init_distributed(cfg)
    if resume and (run_dir / "config.json").is_file():
        saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["run"])
        if {**saved.to_dict(), "device": None} != {**cfg.to_dict(), "device": None}:
            raise ValueError(f"--resume: {run_dir}/config.json differs from the options given; "
                             "resume with the same options")
    if rank == 0:
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        atomic_write_json(run_dir / "config.json", {"kind": "svi", "run": cfg.to_dict()})
    if dist.is_initialized():
        dist.barrier()
    pyro.clear_param_store()
    # the model needs N before the data is tokenised: count examples first
    train_examples = load_examples(task, "train", limit=cfg.train_limit, split_seed=cfg.split_seed)
    model, tok = build_for(cfg, task, len(train_examples), cache)
    train_data = encode_examples(train_examples, tok, task.num_classes, cfg.max_length)
    guide = _guide(cfg, model)
    kl = KL_SCHEDULES[cfg.kl_schedule](KLScheduleArgs(cfg.kl_weight, cfg.kl_anneal_steps, len(train_data),
                                                      cfg.optim.batch_size))
    trainer = SVITrainer(model, guide, cfg.optim, elbo=ELBOS[cfg.elbo](), use_flipout=bool(cfg.flipout),
                         kl_schedule=kl, run_dir=run_dir, progress=progress)
    with lora_dropout_active(model, enabled=cfg.lora_dropout > 0):
        history = trainer.fit(train_data, resume=resume)
    if rank > 0:  # other ranks of a torchrun job: rank 0 saves and evaluates
        return {}
    atomic_write_json(run_dir / "history.json", history)
    first = train_data.batch(torch.arange(min(2, len(train_data))), model.device)
    write_back_means(model, guide, first)
    model.peft_model.save_pretrained(str(run_dir / "adapter"))
    save_params(run_dir / "guide.safetensors", trainer.param_names, {"guide": cfg.guide})
    if not evaluate_after:
        return {}
    metrics, _ = evaluate_loaded(LoadedRun(model, guide, tok, cfg, task, run_dir), task, progress=progress)
    return {f"{task.name}/test": metrics.as_dict()}


def load_svi_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun:
    """Rebuild a trained SVI run's model and guide from its folder (safetensors only)."""
    run_dir = Path(run_dir)
    cfg = RunConfig.from_dict(read_config(run_dir)["run"])
    if device is not None:
        cfg.device = device
    task = get_task(cfg.task)
    pyro.clear_param_store()
    model, tok = build_for(cfg, task, None, cache)
    guide = _guide(cfg, model)
    data = load_split(cfg, task, "train", tok, limit=2)
    batch = data.batch(torch.arange(len(data)), model.device)
    guide(**batch)
    model(**batch)
    load_params(run_dir / "guide.safetensors")
    return LoadedRun(model, guide, tok, cfg, task, run_dir)


def evaluate_loaded(run: LoadedRun, task: TaskSpec, *, split: str = "test", samples: int | None = None,
                    limit: int | None = None, progress: bool = True) -> tuple[Metrics, torch.Tensor]:
    """Evaluate a loaded SVI run on ``task``/``split`` with its N-sample predictive."""
    cfg = run.config
    n = cfg.eval_samples if samples is None else samples
    point = GUIDES[cfg.guide].point
    mc_dropout = point and cfg.lora_dropout > 0 and n > 0  # MC dropout on the LoRA input
    if point and not mc_dropout:
        n = 0  # a point mass: every sample is the same network

    def predict(data: EncodedDataset) -> torch.Tensor:
        with lora_dropout_active(run.model, enabled=mc_dropout):
            return predict_proba(run.model, run.guide, data, num_samples=n, batch_size=cfg.eval_batch_size,
                                 max_rows=cfg.max_rows, progress=progress, desc=f"eval {task.name}",
                                 resample_guide=not mc_dropout)

    return score(run, task, split, limit, predict, extra={"samples": n})


