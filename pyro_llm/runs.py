"""Runs: train, save, reload and evaluate, as plain Python functions (the CLI calls these).

Run directory layout::

    RUN_DIR/
      config.json                 the resolved RunConfig (plus "kind": "svi" or "laplace")
      adapter/                    peft adapter of the posterior mean / MAP
                                  (adapter_config.json + adapter_model.safetensors; PeftModel loads it)
      guide.safetensors           every pyro.param of model and guide (unconstrained values)
      checkpoint/                 the latest training checkpoint (see pyro_llm.infer.checkpoint)
      history.json                loss per step
      metrics.json                {"<task>/<split>": {accuracy, ece, nll, brier, ...}}
      predictions/<task>_<split>.safetensors   predictive probabilities and labels of each evaluation
      reliability_<task>.png      reliability diagram of each evaluation
      laplace/                    Laplace runs only: K-FAC factors and prior precisions
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import distributed as dist

from .config import RunConfig
from .data import CLASSIFICATION, EncodedDataset, TaskSpec, encode_examples, get_task, load_examples
from .data.prompts import answer_strings
from .evaluation import Metrics, compute_metrics, plot_reliability, predict_proba
from .guides import guide_median, make_guide
from .infer import SVITrainer, load_params, make_elbo, make_kl_schedule, save_params
from .io import atomic_save_tensors, atomic_write_json
from .models import lora_dropout_active
from .models import AnswerTokenHead, BayesianLoRAModel, LoRAOptions, answer_token_ids, build_model, resolve_device
from .priors import prior_from_name

__all__ = ["RunDirExistsError", "LoadedRun", "prepare_run_dir", "train", "load_run", "evaluate", "record_metrics",
           "zero_shot", "retarget_head", "load_split"]

log = logging.getLogger(__name__)


class RunDirExistsError(FileExistsError):
    """The run directory already holds a run and neither overwrite nor resume was asked for."""


def prepare_run_dir(run_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other")
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise RunDirExistsError(f"run directory {run_dir} is not empty; pass --overwrite to replace it "
                                    "or --resume to continue its training")
    elif resume:
        raise FileNotFoundError(f"--resume: run directory {run_dir} does not exist or is empty")
    run_dir.mkdir(parents=True, exist_ok=True)


def model_name_for(cfg: RunConfig, task: TaskSpec) -> str:
    return cfg.model or task.default_model


def _build(cfg: RunConfig, task: TaskSpec, dataset_size: int | None, cache: str | None,
           adapter_dir: Path | None = None) -> tuple[BayesianLoRAModel, Any]:
    lora = LoRAOptions(cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.targets)
    return build_model(model_name_for(cfg, task), task, lora=lora, prior=prior_from_name(cfg.prior, cfg.prior_scale),
                       b_site=cfg.b_site, dataset_size=dataset_size, device=resolve_device(cfg.device),
                       dtype=cfg.dtype, cache=cache, seed=cfg.optim.seed, adapter_dir=adapter_dir)


def _guide(cfg: RunConfig, model: BayesianLoRAModel) -> Any:
    return make_guide(cfg.guide, model, eps=cfg.blob_eps, sigma_param=cfg.sigma_param,
                      init_scale=cfg.normal_init_scale)


def load_split(cfg: RunConfig, task: TaskSpec, split: str, tokenizer: Any, limit: int | None) -> EncodedDataset:
    examples = load_examples(task, split, limit=limit, split_seed=cfg.split_seed)
    if not examples:
        raise ValueError(f"task {task.name} has no {split} examples")
    return encode_examples(examples, tokenizer, task.num_classes, cfg.max_length)


def record_metrics(run_dir: Path, key: str, metrics: Metrics, probs: torch.Tensor, labels: torch.Tensor,
                   extra: dict[str, Any] | None = None) -> None:
    """Merge one evaluation into ``metrics.json`` and draw its reliability diagram."""
    path = run_dir / "metrics.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[key] = {**metrics.as_dict(), **(extra or {})}
    atomic_write_json(path, table)
    atomic_save_tensors(run_dir / "predictions" / f"{key.replace('/', '_')}.safetensors",
                        {"probs": probs.float(), "labels": labels})
    plot_reliability({key: (probs, labels)}, run_dir / f"reliability_{key.replace('/', '_')}.png",
                     n_bins=metrics.ece_bins, title=key)


def write_back_means(model: BayesianLoRAModel, guide: Any, batch: dict[str, torch.Tensor]) -> None:
    """Store the guide's point estimate in the site modules so peft saves it as the adapter."""
    with torch.no_grad():
        for name, value in guide_median(guide, batch).items():
            model.site(name).module.weight.copy_(value.to(model.site(name).module.weight.dtype))


def init_distributed(cfg: RunConfig) -> int:
    """Join the process group when launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1):
    NCCL with one GPU per local rank, or gloo on CPU. Returns this process's rank (0 when alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            cfg.device = f"cuda:{local}"
    return dist.get_rank()


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
    model, tok = _build(cfg, task, len(train_examples), cache)
    train_data = encode_examples(train_examples, tok, task.num_classes, cfg.max_length)
    guide = _guide(cfg, model)
    kl = make_kl_schedule(cfg.kl_schedule, weight=cfg.kl_weight, anneal_steps=cfg.kl_anneal_steps,
                          dataset_size=len(train_data), batch_size=cfg.optim.batch_size)
    trainer = SVITrainer(model, guide, cfg.optim, elbo=make_elbo(cfg.elbo), use_flipout=cfg.flipout,
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


@dataclass
class LoadedRun:
    model: BayesianLoRAModel
    guide: Any
    tokenizer: Any
    config: RunConfig
    task: TaskSpec
    run_dir: Path


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pyro-llm run (no config.json)")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun:
    """Rebuild a trained SVI run's model and guide from its folder (safetensors only)."""
    run_dir = Path(run_dir)
    raw = read_config(run_dir)
    if raw.get("kind") == "laplace":
        from .laplace_run import load_laplace_run

        return load_laplace_run(run_dir, device=device, cache=cache)
    if raw.get("kind") != "svi":
        raise ValueError(f"{run_dir} is a {raw.get('kind')!r} run, which has no trained weights to evaluate "
                         "(for the base model use `pyro-llm zero-shot --task ...`)")
    cfg = RunConfig.from_dict(raw["run"])
    if device is not None:
        cfg.device = device
    task = get_task(cfg.task)
    pyro.clear_param_store()
    model, tok = _build(cfg, task, None, cache)
    guide = _guide(cfg, model)
    data = load_split(cfg, task, "train", tok, limit=2)
    batch = data.batch(torch.arange(len(data)), model.device)
    guide(**batch)
    model(**batch)
    load_params(run_dir / "guide.safetensors")
    return LoadedRun(model, guide, tok, cfg, task, run_dir)


def retarget_head(run: LoadedRun, task: TaskSpec) -> None:
    """Point a loaded run's head at ``task`` (out-of-distribution evaluation): the answer-token
    head of a causal LM takes the task's number of letters; a classifier must match its classes."""
    if (task.kind == CLASSIFICATION) != (run.task.kind == CLASSIFICATION):
        raise ValueError(f"run {run.run_dir} was trained on a {run.task.kind} task; {task.name} is {task.kind}")
    if task.kind == CLASSIFICATION:
        if task.num_classes != run.task.num_classes:
            raise ValueError(f"{task.name} has {task.num_classes} classes; the run's classifier has {run.task.num_classes}")
        return
    run.model.head = AnswerTokenHead(answer_token_ids(run.tokenizer, answer_strings(task.num_classes)))


def score(run: Any, task: TaskSpec, split: str, limit: int | None, predict: Any, suffix: str = "",
          extra: dict[str, Any] | None = None) -> tuple[Metrics, torch.Tensor]:
    """The evaluation every run kind shares: point the head at ``task``, read ``split``, predict
    with ``predict(data) -> probs``, then record metrics, predictions and the reliability diagram
    under ``<task>/<split><suffix>``."""
    cfg = run.config
    retarget_head(run, task)
    data = load_split(cfg, task, split, run.tokenizer, limit if limit is not None else cfg.test_limit)
    probs = predict(data)
    metrics = compute_metrics(probs, data.labels, n_bins=cfg.ece_bins)
    record_metrics(run.run_dir, f"{task.name}/{split}{suffix}", metrics, probs, data.labels, extra)
    return metrics, probs


def evaluate_loaded(run: LoadedRun, task: TaskSpec, *, split: str = "test", samples: int | None = None,
                    limit: int | None = None, progress: bool = True) -> tuple[Metrics, torch.Tensor]:
    """Evaluate a loaded SVI run on ``task``/``split`` with its N-sample predictive."""
    cfg = run.config
    n = cfg.eval_samples if samples is None else samples
    mc_dropout = cfg.guide == "map" and cfg.lora_dropout > 0 and n > 0  # MC dropout on the LoRA input
    if cfg.guide == "map" and not mc_dropout:
        n = 0  # a point mass: every sample is the same network

    def predict(data: EncodedDataset) -> torch.Tensor:
        with lora_dropout_active(run.model, enabled=mc_dropout):
            return predict_proba(run.model, run.guide, data, num_samples=n, batch_size=cfg.eval_batch_size,
                                 max_rows=cfg.max_rows, progress=progress, desc=f"eval {task.name}",
                                 resample_guide=not mc_dropout)

    return score(run, task, split, limit, predict, extra={"samples": n})


def zero_shot(cfg: RunConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
              cache: str | None = None) -> dict[str, Any]:
    """Evaluate the base model (LoRA ``B = 0``, i.e. no adapter) on ``cfg.task``'s test split."""
    run_dir = Path(run_dir)
    task = get_task(cfg.task)
    prepare_run_dir(run_dir, overwrite=overwrite)
    cfg.guide = "map"
    atomic_write_json(run_dir / "config.json", {"kind": "zero-shot", "run": cfg.to_dict()})
    pyro.clear_param_store()
    model, tok = _build(cfg, task, None, cache)

    class _Base:  # the adapter's initial point: B = 0, so the network is the base model
        def median(self, **_: Any) -> dict[str, torch.Tensor]:
            return model.point_values()

    metrics, _ = evaluate_loaded(LoadedRun(model, _Base(), tok, cfg, task, run_dir), task, samples=0,
                                 progress=progress)
    return {f"{task.name}/test": metrics.as_dict()}


def evaluate(run_dir: str | Path, task: str | None = None, *, split: str = "test", samples: int | None = None,
             limit: int | None = None, device: str | None = None, progress: bool = True,
             cache: str | None = None, **kwargs: Any) -> Metrics:
    """Evaluate a saved run (SVI or Laplace) on ``task`` (default: its training task)."""
    run = load_run(run_dir, device=device, cache=cache)
    spec = get_task(task) if task else run.task
    if hasattr(run, "evaluate"):
        return run.evaluate(spec, split=split, limit=limit, progress=progress, **kwargs)
    return evaluate_loaded(run, spec, split=split, samples=samples, limit=limit, progress=progress)[0]
