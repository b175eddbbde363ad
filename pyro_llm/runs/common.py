"""What every kind of run shares: the run folder, building the model from a configuration, reading
splits, recording an evaluation, joining a process group.

Run directory layout::

    RUN_DIR/
      config.json                 {"kind": "svi" | "laplace" | "zero-shot", "state": ..., "run": the kind's
                                  resolved configuration (.config.CONFIG_KINDS)}
      adapter/                    peft adapter of the posterior mean / MAP
                                  (adapter_config.json + adapter_model.safetensors; PeftModel loads it)
      guide.safetensors           every pyro.param of model and guide (unconstrained values)
      checkpoint/                 the latest training checkpoint (see pyro_llm.infer.checkpoint)
      history.json                loss per step, with its NLL and KL parts and the KL weight
      scales.json                 guides that report them: posterior std statistics per site
      metrics.json                {"<task>/<split>": {accuracy, ece, nll, brier, ...}}
      predictions/<task>_<split>.safetensors   predictive probabilities and labels of each evaluation
      reliability_<task>.png      reliability diagram of each evaluation
      laplace/                    Laplace runs only: K-FAC factors and prior precisions
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyro
import torch
from torch import distributed as dist

from .. import ranks
from ..data import CLASSIFICATION, EncodedDataset, TaskSpec, encode_examples, get_task, load_examples
from ..evaluation import Metrics, compute_metrics, plot_reliability
from ..io import CorruptFileError, atomic_save_tensors, atomic_write_json, load_tensors, read_json
from ..models import BayesianLoRAModel, build_model, head_for, resolve_device
from .compat import run_section
from .config import CONFIG_KINDS, BaseRunConfig

__all__ = ["LoadedRun", "build_for", "evaluation_limit", "load_predictions", "load_split", "process_group",
           "model_name_for", "read_config", "rebuild", "record_metrics", "recorded_predictions", "retarget_head",
           "run_config_of", "score", "write_config"]

from .lock import RunLock

log = logging.getLogger(__name__)


def write_config(run_dir: Path, cfg: BaseRunConfig, *, state: str, **extra: Any) -> None:
    """``config.json``: the run's kind, its configuration (the kind's own fields, nothing else), and
    whether it is still running (a run stopped before its first checkpoint is started afresh by its
    rerun, see :mod:`.folder`)."""
    atomic_write_json(run_dir / "config.json", {"kind": cfg.KIND, "state": state, "run": cfg.to_dict(), **extra})


def model_name_for(cfg: BaseRunConfig, task: TaskSpec) -> str:
    return cfg.model.name or task.default_model


def build_for(cfg: BaseRunConfig, task: TaskSpec, dataset_size: int | None, cache: str | None,
              adapter_dir: Path | None = None) -> tuple[BayesianLoRAModel, Any]:
    """The model and tokenizer ``cfg`` describes (its kind says which LoRA, prior and sites)."""
    m = cfg.model
    lora, prior, b_site = cfg.model_parts()
    return build_model(model_name_for(cfg, task), task, lora=lora, prior=prior, b_site=b_site,
                       dataset_size=dataset_size, device=resolve_device(m.device), dtype=m.dtype, cache=cache,
                       seed=cfg.seed, adapter_dir=adapter_dir, attn_implementation=m.attn_implementation,
                       quantize=m.quantize, gradient_checkpointing=m.gradient_checkpointing)


def load_split(cfg: BaseRunConfig, task: TaskSpec, split: str, tokenizer: Any, limit: int | None) -> EncodedDataset:
    examples = load_examples(task, split, limit=limit, split_seed=cfg.data.split_seed,
                             fractions=cfg.data.split_fractions)
    if not examples:
        raise ValueError(f"task {task.name} has no {split} examples")
    return encode_examples(examples, tokenizer, task.num_classes, cfg.data.max_length)


def record_metrics(run_dir: Path, key: str, metrics: Metrics, probs: torch.Tensor, labels: torch.Tensor,
                   extra: dict[str, Any] | None = None) -> None:
    """Merge one evaluation into ``metrics.json`` and draw its reliability diagram. The predictions
    and the diagram are written first and ``metrics.json`` last, so an entry there always has its
    files; the read-modify-write of ``metrics.json`` holds the run's lock (:class:`~.lock.RunLock`,
    waiting up to a minute for another command), so two evaluations never drop each other's entry."""
    with RunLock(run_dir, wait=60.0):
        atomic_save_tensors(_predictions_file(run_dir, key), {"probs": probs.float(), "labels": labels})
        plot_reliability({key: (probs, labels)}, run_dir / f"reliability_{key.replace('/', '_')}.png",
                         n_bins=metrics.ece_bins, title=key)
        table = read_metrics(run_dir)
        table[key] = {**metrics.as_dict(), **(extra or {})}
        atomic_write_json(run_dir / "metrics.json", table)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` by entry key (empty before its first evaluation)."""
    path = run_dir / "metrics.json"
    return read_json(path, "metrics") if path.is_file() else {}


@contextlib.contextmanager
def process_group(cfg: BaseRunConfig) -> Iterator[int]:
    """Join the process group when launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1):
    NCCL with one GPU per local rank, or gloo on CPU. Yields this process's rank (0 when alone).

    A group joined here is destroyed on leaving, on every rank: a process that exits holding a live
    gloo group can abort in its destructor ("terminate called without an active exception"), which
    fails the whole torchrun job after a complete run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    joined = not dist.is_initialized()
    if joined:
        use_cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            cfg.model.device = f"cuda:{local}"
    try:
        yield dist.get_rank()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class LoadedRun:
    model: BayesianLoRAModel
    guide: Any
    tokenizer: Any
    config: BaseRunConfig
    task: TaskSpec
    run_dir: Path


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pyro-llm run (no config.json)")
    raw = read_json(path, "run configuration")
    if not isinstance(raw, dict) or not isinstance(raw.get("run"), dict):
        raise CorruptFileError(f"run configuration {path} is not one pyro-llm wrote (no 'run' section)")
    return raw


def run_config_of(run_dir: Path) -> Any:
    """The configuration saved in a run folder, of its kind's class (:data:`.config.CONFIG_KINDS`);
    an invalid one is an error naming the file."""
    raw = read_config(run_dir)
    kind = raw.get("kind", "svi")
    if kind not in CONFIG_KINDS:
        raise CorruptFileError(f"{run_dir}/config.json names the run kind {kind!r}; expected one of "
                               f"{', '.join(CONFIG_KINDS)}")
    try:
        return CONFIG_KINDS[kind].from_dict(run_section(raw))
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"run configuration {run_dir / 'config.json'} is invalid: {err}") from err


def rebuild(run_dir: Path, device: str | None, cache: str | None) -> tuple[Any, TaskSpec, BayesianLoRAModel, Any]:
    """A saved run's configuration (its device replaced by ``device``), task, and freshly built model
    and tokenizer, with an empty parameter store."""
    cfg = run_config_of(run_dir)
    if device is not None:
        cfg.model.device = device
    task = get_task(cfg.task)
    pyro.clear_param_store()
    model, tok = build_for(cfg, task, None, cache)
    return cfg, task, model, tok


def retarget_head(run: LoadedRun, task: TaskSpec) -> None:
    """Point a loaded run's head at ``task`` (out-of-distribution evaluation): the answer-token
    head of a causal LM takes the task's number of letters, a cloze head any number of choices;
    a classifier must match its classes. The task must be of the run's kind."""
    if task.kind != run.task.kind:
        raise ValueError(f"run {run.run_dir} was trained on a {run.task.kind} task; {task.name} is {task.kind}")
    if task.kind == CLASSIFICATION and task.num_classes != run.task.num_classes:
        raise ValueError(f"{task.name} has {task.num_classes} classes; the run's classifier has {run.task.num_classes}")
    run.model.head = head_for(task, run.tokenizer)


def _predictions_file(run_dir: Path, key: str) -> Path:
    return run_dir / "predictions" / f"{key.replace('/', '_')}.safetensors"


def load_predictions(run_dir: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, labels)`` that :func:`record_metrics` saved under ``key`` (``<task>/<split>[/<tag>]``)."""
    saved = load_tensors(_predictions_file(run_dir, key))
    return saved["probs"], saved["labels"]


def evaluation_limit(cfg: BaseRunConfig, limit: int | None) -> int | None:
    """The examples an evaluation reads: ``limit``, or the run's test limit when none is given."""
    return limit if limit is not None else cfg.data.test_limit


def score(run: Any, task: TaskSpec, split: str, limit: int | None, predict: Any, suffix: str = "",
          extra: dict[str, Any] | None = None) -> tuple[Metrics, torch.Tensor, torch.Tensor]:
    """The evaluation every run kind shares: point the head at ``task``, read ``split`` (a seeded
    subset of ``limit`` examples, ``None``: all; a test evaluation passes
    :func:`evaluation_limit`'s), predict with ``predict(data) -> probs``, then record metrics,
    predictions and the reliability diagram under ``<task>/<split><suffix>``. Returns the metrics,
    the probabilities and the labels."""
    cfg = run.config
    retarget_head(run, task)
    data = load_split(cfg, task, split, run.tokenizer, limit)
    probs = predict(data)
    metrics = compute_metrics(probs, data.labels, n_bins=cfg.eval.ece_bins)
    # the limit is recorded with the predictive's facts: together they name the examples and draws
    if ranks.world()[0] == 0:  # under several ranks each predicted its share; rank 0 records the whole
        record_metrics(run.run_dir, f"{task.name}/{split}{suffix}", metrics, probs, data.labels,
                       {**(extra or {}), "limit": limit})
    return metrics, probs, data.labels


def recorded_predictions(run_dir: Path, task: TaskSpec, split: str, facts: dict[str, Any],
                         limit: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(probs, labels)`` an earlier, untempered evaluation of ``task``/``split`` recorded with the
    same predictive facts (samples, seed, predictive) and limit, or ``None``: the same examples
    and draws, so a tempered evaluation can reuse them instead of predicting again."""
    prefix = f"{task.name}/{split}"  # a task read from a file may have "/" in its name
    for key, entry in read_metrics(run_dir).items():
        if ((key == prefix or key.startswith(prefix + "/")) and "temperature" not in entry and "limit" in entry
                and entry["limit"] == limit and all(entry.get(k) == v for k, v in facts.items())):
            if _predictions_file(run_dir, key).is_file():
                return load_predictions(run_dir, key)
    return None


