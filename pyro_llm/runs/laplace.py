"""``pyro-llm laplace``: a post-hoc Laplace posterior for any LoRA adapter, saved as a run.

``--adapter`` is a pyro-llm MAP run folder (its ``adapter/`` is used) or any peft LoRA adapter
folder (``adapter_config.json`` + weights). The base model is the run's, the adapter's
``base_model_name_or_path``, or ``--model``. Layout of a Laplace run::

    RUN_DIR/config.json           {"kind": "laplace", "run": LaplaceRunConfig (the model as built)}
    RUN_DIR/adapter/              a copy of the MAP adapter (the run does not depend on --adapter later)
    RUN_DIR/laplace/guide.safetensors   K-FAC eigen-factors, MAP means, prior precision(s)
    RUN_DIR/laplace/fit.json      log-likelihood, evidence, prior precision, fit time
    RUN_DIR/metrics.json, reliability_*.png

Under ``torchrun`` / ``accelerate launch`` every rank fits and evaluates its share of the data
(the K-FAC pass, the GLM and sampled predictives; see :mod:`pyro_llm.ranks`), all hold the same
posterior, and rank 0 alone decides about the run folder and writes it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from ..data import TaskSpec, get_task
from ..evaluation import predict_proba
from ..evaluation.glm import linearised_predict
from ..guides import LaplaceGuide
from ..infer.laplace import fit_laplace, tune_prior_precision
from .. import ranks
from ..checks import check_int
from ..io import atomic_write_json, read_json
from ..models import lora_options_from_adapter
from .common import (build_for, evaluation_limit, load_split, process_group, read_config, run_config_of, score,
                     write_config)
from .config import LaplaceConfig, LaplaceRunConfig, SVIConfig
from .folder import RunFolder
from .registry import PREDICTIVES, lookup

__all__ = ["LaplaceRun", "laplace", "load_laplace_run", "resolve_adapter"]


def resolve_adapter(adapter: str | Path, model: str | None) -> tuple[Path, str, SVIConfig | LaplaceRunConfig | None]:
    """``(peft adapter folder, base model name, the configuration of the run it belongs to if it is
    one of ours)``."""
    path = Path(adapter)
    run_cfg = None
    if (path / "config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        run_cfg = run_config_of(path)
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is neither a pyro-llm run nor a peft adapter folder "
                                "(no adapter_config.json)")
    base = model or ((run_cfg.model.name or get_task(run_cfg.task).default_model) if run_cfg else None)
    if base is None:
        base = read_json(path / "adapter_config.json", "adapter configuration").get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: the adapter names no base model; pass --model")
    return path, base, run_cfg


class LaplaceRun:
    """A loaded Laplace run: model (A and B sites at the MAP), guide, and its predictives."""

    def __init__(self, model: Any, guide: LaplaceGuide, tokenizer: Any, config: LaplaceRunConfig, task: TaskSpec,
                 run_dir: Path) -> None:
        self.model, self.guide, self.tokenizer = model, guide, tokenizer
        self.config, self.task, self.run_dir = config, task, run_dir

    @property
    def lconfig(self) -> LaplaceConfig:
        """The run's Laplace section."""
        return self.config.laplace

    def predict(self, data: Any, predictive: str | None = None, samples: int | None = None,
                progress: bool = True) -> torch.Tensor:
        kind = predictive or self.lconfig.predictive
        lookup(PREDICTIVES, kind, "predictive")
        if kind == "nn":
            n = self.config.eval.samples if samples is None else samples
            check_int("samples", n, low=0)
            return predict_proba(self.model, self.guide, data, num_samples=n, batch_size=self.config.eval.batch_size,
                                 max_rows=self.config.eval.max_rows, progress=progress)
        if kind == "map":
            return predict_proba(self.model, self.guide, data, num_samples=0, progress=progress)
        return linearised_predict(self.guide, data, mc_samples=self.lconfig.mc_samples if kind == "glm-mc" else None,
                                  batch_size=self.config.eval.batch_size, max_tokens=self.lconfig.glm_max_tokens,
                                  progress=progress)

    def predictor(self, predictive: str | None = None, samples: int | None = None, seed: int | None = None,
                  progress: bool = True) -> tuple[Callable[[Any], torch.Tensor], dict[str, Any]]:
        """``(predict, facts)``: :meth:`predict` with ``predictive`` as ``predict(data) -> probs``,
        every call drawing from ``seed`` (default: the run's), and the facts to record beside it."""
        kind = predictive or self.lconfig.predictive
        lookup(PREDICTIVES, kind, "predictive")
        seed = self.config.seed if seed is None else seed

        def predict(data: Any) -> torch.Tensor:
            pyro.set_rng_seed(seed)
            return self.predict(data, kind, samples, progress)

        facts: dict[str, Any] = {"predictive": kind, "seed": seed}
        if kind == "nn":  # the sampled predictive's draws depend on N too
            facts["samples"] = self.config.eval.samples if samples is None else samples
        return predict, facts

    def evaluate(self, task: TaskSpec, *, split: str = "test", limit: int | None = None, progress: bool = True,
                 predictive: str | None = None, samples: int | None = None, seed: int | None = None):
        """Score ``task``/``split`` (recorded under ``<task>/<split>``, plus ``/<predictive>`` for
        another than the run's); every random draw comes from ``seed`` (default: the run's)."""
        predict, facts = self.predictor(predictive, samples, seed, progress)
        suffix = "" if facts["predictive"] == self.lconfig.predictive else f"/{facts['predictive']}"
        metrics, _, _ = score(self, task, split, evaluation_limit(self.config, limit), predict, suffix, facts)
        return metrics


def _as_built(cfg: LaplaceRunConfig, adapter_dir: Path, base: str | None,
              adapter_run: SVIConfig | LaplaceRunConfig | None) -> None:
    """Make ``cfg`` describe the model a Laplace run builds: the adapter's LoRA, the prior of the run
    that trained it (a foreign peft adapter: ``cfg``'s, by default N(0, 0.2^2)), the adapter's base
    model (``B`` is a site unless ``cfg.laplace.a_only``)."""
    cfg.model.name = base
    cfg.lora = lora_options_from_adapter(adapter_dir)
    if adapter_run is not None:
        cfg.prior = adapter_run.prior


def _build(cfg: LaplaceRunConfig, task: TaskSpec, adapter_dir: Path, cache: str | None):
    pyro.clear_param_store()
    return build_for(cfg, task, None, cache, adapter_dir=adapter_dir)


def _prior_precision_args(method: str) -> dict[str, Any]:
    """``LaplaceConfig.prior_precision`` as :func:`~pyro_llm.infer.fit_laplace`'s arguments."""
    if method in ("marglik", "marglik-layerwise", "val-nll"):
        return {"prior_precision": "marglik" if method == "marglik-layerwise" else method,
                "layerwise": method == "marglik-layerwise"}
    return {"prior_precision": None if method == "prior" else float(method)}


def laplace(cfg: LaplaceRunConfig, run_dir: str | Path, *, model: str | None = None, overwrite: bool = False,
            progress: bool = True, cache: str | None = None) -> dict[str, Any]:
    """Fit a Laplace posterior to ``cfg.laplace.adapter`` on ``cfg.task`` and evaluate it on the test
    split; ``cfg`` is completed to describe the model as built (the adapter's LoRA and base model,
    the prior of the run that trained it) and recorded so.

    The adapter, the model and the data are loaded before the run folder is touched; the adapter
    (or the run it belongs to) may not be inside the output folder or contain it."""
    run_dir = Path(run_dir)
    lcfg = cfg.laplace
    given = Path(lcfg.adapter)
    adapter_dir, base, adapter_run = resolve_adapter(given, model or cfg.model.name)
    with process_group(cfg) as rank:
        folder = _folder_of_rank_0(rank, run_dir, overwrite, (given, adapter_dir, base, cfg.task,
                                                               lcfg.curvature_from or None))
        try:
            _as_built(cfg, adapter_dir, base, adapter_run)
            return _laplace_in(folder, cfg, adapter_dir, run_dir, progress=progress and rank == 0, cache=cache)
        finally:
            if folder is not None:
                folder.release()


def _folder_of_rank_0(rank: int, run_dir: Path, overwrite: bool, inputs: tuple[Any, ...]) -> RunFolder | None:
    """Rank 0's :class:`RunFolder` (``None`` on the other ranks, which write nothing); a folder rank
    0 refuses stops every rank, with rank 0's error on rank 0."""
    folder, failure = None, None
    if rank == 0:
        try:
            folder = RunFolder(run_dir, overwrite=overwrite, inputs=inputs)
        except Exception as err:  # noqa: BLE001  (re-raised below, once the other ranks know)
            failure = err
    refused = ranks.max_across([torch.tensor([float(failure is not None)])])[0]
    if failure is not None:
        raise failure
    if bool(refused[0]):
        raise RuntimeError(f"rank 0 refused the run folder {run_dir} (its error says why)")
    return folder


def _laplace_in(folder: RunFolder | None, cfg: LaplaceRunConfig, adapter_dir: Path, run_dir: Path, *,
                progress: bool, cache: str | None) -> dict[str, Any]:
    task = get_task(cfg.task)
    lcfg = cfg.laplace
    lcfg.adapter = str(adapter_dir.resolve())
    net, tok = _build(cfg, task, adapter_dir, cache)
    train = load_split(cfg, task, "train", tok, cfg.data.train_limit)
    validation = load_split(cfg, task, "validation", tok, None) if lcfg.prior_precision == "val-nll" else None
    net.dataset_size = len(train)
    source = _curvature_source(cfg, adapter_dir) if lcfg.curvature_from else None
    with folder if folder is not None else contextlib.nullcontext(None) as out:
        if out is not None:
            # config.json first: a kill during the copy leaves a run that its rerun starts afresh
            write_config(out, cfg, state="running")
            shutil.copytree(adapter_dir, out / "adapter")  # the run is self-contained
        start = time.perf_counter()
        if source is None:
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
            fit = fit_laplace(net, train, lcfg.kfac, validation=validation, glm_max_tokens=lcfg.glm_max_tokens,
                              glm_batch_size=cfg.eval.batch_size,
                              progress=progress, generator=gen,
                              a_only=lcfg.a_only,
                              **_prior_precision_args(lcfg.prior_precision))
            guide, log_likelihood, num_examples = fit.guide, fit.factors.log_likelihood, fit.factors.num_examples
        else:
            guide = LaplaceGuide.load(net, source / "laplace" / "guide.safetensors")
            facts = read_json(source / "laplace" / "fit.json", "Laplace fit")
            log_likelihood, num_examples = float(facts["log_likelihood"]), int(facts["num_examples"])
            tune_prior_precision(guide, log_likelihood=log_likelihood, validation=validation,
                                 batch_size=cfg.eval.batch_size, max_tokens=lcfg.glm_max_tokens, progress=progress,
                                 **_prior_precision_args(lcfg.prior_precision))
        fit_seconds = time.perf_counter() - start
        lml = float(guide.log_marginal_likelihood(log_likelihood))
        if out is not None:
            guide.save(out / "laplace" / "guide.safetensors")
            atomic_write_json(out / "laplace" / "fit.json", {
                "log_likelihood": log_likelihood, "log_marginal_likelihood": lml,
                "prior_precision": guide.prior_precision.tolist(), "num_examples": num_examples,
                "fit_seconds": fit_seconds, "num_params": sum(b.numel for b in guide.blocks.values()),
                **({"curvature_from": str(source)} if source is not None else {})})
        # every rank evaluates its share; rank 0 records (score)
        metrics = LaplaceRun(net, guide, tok, cfg, task, out or run_dir).evaluate(task, progress=progress)
        if out is not None:
            write_config(out, cfg, state="finished")
    return {f"{task.name}/test": metrics.as_dict(), "log_marginal_likelihood": lml,
            "prior_precision": guide.prior_precision.tolist()}


def _curvature_source(cfg: LaplaceRunConfig, adapter_dir: Path) -> Path:
    """The finished Laplace run named by ``cfg.laplace.curvature_from``, checked to hold the K-FAC of
    this very adapter (same weights), task, training examples and K-FAC settings."""
    lcfg = cfg.laplace
    source = Path(lcfg.curvature_from)
    raw = read_config(source)
    if raw.get("kind") != "laplace" or raw.get("state") != "finished":
        raise ValueError(f"--curvature-from {source} is not a finished Laplace run")
    theirs = run_config_of(source)
    other = theirs.laplace
    weights = [f for f in adapter_dir.iterdir() if f.suffix == ".safetensors"]
    same_weights = bool(weights) and all((source / "adapter" / f.name).is_file() and
                                         (source / "adapter" / f.name).read_bytes() == f.read_bytes() for f in weights)
    mismatches = [what for what, same in (
        ("adapter weights", same_weights), ("base model", theirs.model.name == cfg.model.name),
        ("task", theirs.task == cfg.task),
        ("seed of the sampled Fisher", lcfg.kfac.fisher != "mc" or theirs.seed == cfg.seed),
        ("training data", asdict(theirs.data) == asdict(cfg.data)), ("K-FAC settings", other.kfac == lcfg.kfac),
        ("sites (a_only)", other.a_only == lcfg.a_only)) if not same]
    if mismatches:
        raise ValueError(f"--curvature-from {source} was fitted with other {', '.join(mismatches)}; "
                         "its curvature does not describe this posterior")
    return source


def load_laplace_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LaplaceRun:
    """A finished Laplace run's model (at the MAP), guide and predictives, from its folder."""
    run_dir = Path(run_dir)
    cfg = run_config_of(run_dir)
    if not isinstance(cfg, LaplaceRunConfig):
        raise ValueError(f"{run_dir} is not a Laplace run")
    if device is not None:
        cfg.model.device = device
    task = get_task(cfg.task)
    # the LoRA as the adapter says (releases before the per-kind configurations recorded the default)
    _as_built(cfg, run_dir / "adapter", cfg.model.name, None)
    net, tok = _build(cfg, task, run_dir / "adapter", cache)
    guide = LaplaceGuide.load(net, run_dir / "laplace" / "guide.safetensors")
    return LaplaceRun(net, guide, tok, cfg, task, run_dir)
