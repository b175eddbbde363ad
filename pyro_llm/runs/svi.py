"""SVI runs: train a guide into a run folder, reload it, evaluate its N-sample predictive."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import pyro
import torch
from torch import distributed as dist

from ..checks import check_int, check_real
from ..data import EncodedDataset, TaskSpec, encode_examples, get_task, load_examples
from ..evaluation import Metrics, predict_proba
from ..evaluation.glm import linearised_predict
from ..guides import scale_summary, write_back_means
from ..guides.ops import guide_scales
from ..infer import SVITrainer, load_params, save_params
from ..infer.checkpoint import find_checkpoint
from ..infer.reprior import data_precisions, search_prior_precision, variances_at
from ..io import atomic_write_json, read_json
from ..models import lora_dropout_active
from ..priors import gaussian_precision
from .common import (LoadedRun, build_for, evaluation_limit, load_split, process_group, read_config, rebuild,
                     run_config_of, score, write_config)
from .config import SVIConfig
from .folder import RunFolder
from .registry import ELBOS, GUIDES

__all__ = ["GLM_MC_SAMPLES", "SVI_PREDICTIVES", "evaluate_loaded", "linearised_predictor", "load_svi_run",
           "svi_predictor", "train"]


def train(cfg: SVIConfig, run_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          progress: bool = True, cache: str | None = None, evaluate_after: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and evaluate on the task's test split; returns the metrics.

    The folder, the model and the data are all checked before anything is written (see
    :class:`~.folder.RunFolder` for what ``overwrite`` and ``resume`` may replace)."""
    with process_group(cfg) as rank:
        return _train(cfg, Path(run_dir), rank, overwrite=overwrite, resume=resume, progress=progress, cache=cache,
                      evaluate_after=evaluate_after)


#: Optimiser settings a ``--resume`` may change (after a non-finite stop, say); recorded in
#: ``config.json`` under ``resumes``. Everything else must be as the run was started.
RESUMABLE = ("lr", "g_lr", "warmup_ratio", "decay", "grad_clip", "weight_decay", "checkpoint_every")


def _resume_changes(saved: SVIConfig, cfg: SVIConfig, run_dir: Path) -> dict[str, Any]:
    """The optimiser settings ``cfg`` changes from the run's own; any other difference is refused."""
    def comparable(c: SVIConfig) -> dict[str, Any]:
        d = c.to_dict()
        d["model"] = {**d["model"], "device": None}
        d["optim"] = {k: v for k, v in d["optim"].items() if k not in RESUMABLE}
        return d

    if comparable(saved) != comparable(cfg):
        a, b = comparable(saved), comparable(cfg)
        differ = sorted(f"{section}.{k}" for section in a if isinstance(a[section], dict)
                        for k in a[section] if a[section][k] != b[section].get(k))
        differ += sorted(k for k in a if not isinstance(a[k], dict) and a[k] != b[k])
        raise ValueError(f"--resume: {run_dir}/config.json differs from the options given in {', '.join(differ)}; "
                         f"a resumed run may change only {', '.join(RESUMABLE)}")
    return {k: [getattr(saved.optim, k), getattr(cfg.optim, k)] for k in RESUMABLE
            if getattr(saved.optim, k) != getattr(cfg.optim, k)}


def _train(cfg: SVIConfig, run_dir: Path, rank: int, *, overwrite: bool, resume: bool, progress: bool,
           cache: str | None, evaluate_after: bool) -> dict[str, Any]:
    task = get_task(cfg.task)
    folder = RunFolder(run_dir, overwrite=overwrite, resume=resume, inputs=(cfg.model.name, cfg.task),
                       lock=rank == 0)
    try:
        return _train_in(folder, cfg, task, run_dir, rank, resume=resume, progress=progress, cache=cache,
                         evaluate_after=evaluate_after)
    finally:
        folder.release()


def _train_in(folder: RunFolder, cfg: SVIConfig, task: TaskSpec, run_dir: Path, rank: int, *, resume: bool,
              progress: bool, cache: str | None, evaluate_after: bool) -> dict[str, Any]:
    resumes: list[dict[str, Any]] = []
    continuing = resume and not folder.restart
    if continuing:
        resumes = list(read_config(run_dir).get("resumes", []))
        changed = _resume_changes(run_config_of(run_dir), cfg, run_dir)
        ckpt = find_checkpoint(run_dir)
        if changed and ckpt is not None:
            resumes.append({"step": read_json(ckpt / "state.json", "checkpoint state").get("step"),
                            "changed": changed})
    pyro.clear_param_store()
    # the model needs N before the data is tokenised: count examples first
    train_examples = load_examples(task, "train", limit=cfg.data.train_limit, split_seed=cfg.data.split_seed,
                                   fractions=cfg.data.split_fractions)
    if len(train_examples) < cfg.optim.batch_size:
        raise ValueError(f"task {task.name} has {len(train_examples)} training examples, fewer than the batch size "
                         f"{cfg.optim.batch_size}")
    model, tok = build_for(cfg, task, len(train_examples), cache)
    train_data = encode_examples(train_examples, tok, task.num_classes, cfg.data.max_length)
    guide = cfg.guide.build(model)
    kl = cfg.objective.kl(len(train_data), cfg.optim.batch_size, cfg.optim.steps)
    record = {"resumes": resumes} if resumes else {}
    with folder if rank == 0 else contextlib.nullcontext(folder.path) as out:
        if rank == 0 and (not continuing or record):  # a resumed run's config says how it was resumed
            write_config(out, cfg, state="running", **record)
        if dist.is_initialized():
            dist.barrier()
        trainer = SVITrainer(model, guide, cfg.optim, elbo=ELBOS[cfg.objective.elbo](),
                             use_flipout=bool(cfg.guide.flipout), kl_schedule=kl, run_dir=out, progress=progress)
        with lora_dropout_active(model, enabled=cfg.lora.dropout > 0):
            history = trainer.fit(train_data, resume=continuing)
        first = train_data.batch(torch.arange(min(2, len(train_data))), model.device)
        write_back_means(model, guide, first)
        if rank == 0:  # other ranks of a torchrun job: rank 0 saves; all evaluate their share
            atomic_write_json(out / "history.json", history)
            # the base's embedding layers are never trained: peft would save a whole lm_head targeted by LoRA
            model.peft_model.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
            save_params(out / "guide.safetensors", trainer.param_names, {"guide": cfg.guide.name})
            scales = scale_summary(guide)
            if scales is not None:  # where the posterior is wide, per site (BLoB's sigma)
                atomic_write_json(out / "scales.json", scales)
        metrics: dict[str, Any] = {}
        if evaluate_after:
            m, _ = evaluate_loaded(LoadedRun(model, guide, tok, cfg, task, out), task, progress=progress and rank == 0)
            metrics = {f"{task.name}/test": m.as_dict()}
        if rank == 0:
            write_config(out, cfg, state="finished", **record)
    return metrics


def load_svi_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> LoadedRun:
    """Rebuild a trained SVI run's model and guide from its folder (safetensors only)."""
    run_dir = Path(run_dir)
    cfg, task, model, tok = rebuild(run_dir, device, cache)
    guide = cfg.guide.build(model)
    data = load_split(cfg, task, "train", tok, limit=2)
    batch = data.batch(torch.arange(len(data)), model.device)
    guide(**batch)
    model(**batch)
    load_params(run_dir / "guide.safetensors", upgrade=getattr(guide, "upgrade_saved", None))
    write_back_means(model, guide, batch)  # the modules hold the guide's point estimate, as the saved adapter does
    return LoadedRun(model, guide, tok, cfg, task, run_dir)


#: the predictives of an SVI run: weight samples through the network (the default), or the guide's
#: linearised predictive (a Gaussian guide: its mean and scales)
SVI_PREDICTIVES = ("nn", "glm", "glm-mc")
#: logit draws of an SVI run's ``glm-mc`` predictive (a Laplace run's: ``laplace.mc_samples``)
GLM_MC_SAMPLES = 1000


def svi_predictor(run: LoadedRun, *, samples: int | None = None, seed: int | None = None, progress: bool = True,
                  desc: str = "eval") -> tuple[Callable[[EncodedDataset], torch.Tensor], int]:
    """``(predict, N)``: the run's N-sample predictive as ``predict(data) -> probs``, every call
    drawing its weight samples from ``seed`` (default: the run's). A point guide predicts once
    (``N = 0``), unless it was trained with LoRA dropout: then MC dropout with ``N`` samples."""
    cfg = run.config
    n = cfg.eval.samples if samples is None else samples
    check_int("samples", n, low=0)
    point = GUIDES[cfg.guide.name].point
    mc_dropout = point and cfg.lora.dropout > 0 and n > 0  # MC dropout on the LoRA input
    if point and not mc_dropout:
        n = 0  # a point mass: every sample is the same network
    seed = cfg.seed if seed is None else seed

    def predict(data: EncodedDataset) -> torch.Tensor:
        pyro.set_rng_seed(seed)
        with lora_dropout_active(run.model, enabled=mc_dropout):
            return predict_proba(run.model, run.guide, data, num_samples=n, batch_size=cfg.eval.batch_size,
                                 max_rows=cfg.eval.max_rows, progress=progress, desc=desc,
                                 resample_guide=not mc_dropout, flipout=cfg.eval.flipout and bool(cfg.guide.flipout))

    return predict, n


def settled_kl_weight(run: LoadedRun) -> float:
    """The KL weight of the run's last training step (``history.json``; the configuration's
    ``--kl-weight`` for a run without one): the temperature its scales balanced at, which reading
    the guide under another prior undoes (:func:`~pyro_llm.infer.reprior.data_precisions`)."""
    path = run.run_dir / "history.json"
    if path.is_file():
        history = read_json(path, "training history")
        if isinstance(history, list) and history and isinstance(history[-1], dict) and "kl_weight" in history[-1]:
            return float(history[-1]["kl_weight"])
    return float(run.config.objective.kl_weight)


def linearised_predictor(run: LoadedRun, *, predictive: str = "glm", prior_precision: str | float | None = None,
                         seed: int | None = None, progress: bool = True
                         ) -> tuple[Callable[[EncodedDataset], torch.Tensor], dict[str, Any]]:
    """``(predict, facts)``: the linearised predictive of the run's mean-field Gaussian guide
    (:func:`~pyro_llm.evaluation.glm.linearised_predict`: ``"glm"`` the probit of the logits'
    differences, ``"glm-mc"`` Monte Carlo over the logits, drawn from ``seed``), and the facts to
    record beside it.

    ``prior_precision``: the guide read under another Gaussian prior (:mod:`pyro_llm.infer.reprior`),
    a number, or ``"validation"``: chosen now by the linearised predictive's NLL on the run's own
    validation split (the choice and its grid among the facts); either reads the Bayesian posterior,
    the KL weight the run trained with undone (:func:`settled_kl_weight`); ``None``: the guide as trained."""
    if predictive not in SVI_PREDICTIVES[1:]:
        raise ValueError(f"a linearised predictive is one of {', '.join(SVI_PREDICTIVES[1:])}; got {predictive!r}")
    cfg = run.config
    seed = cfg.seed if seed is None else seed
    scales = guide_scales(run.guide)
    if scales is None:
        raise ValueError(f"--predictive {predictive} needs a Gaussian guide that reports its scales; "
                         f"{run.run_dir} was trained with --guide {cfg.guide.name}")
    facts: dict[str, Any] = {"predictive": predictive, "seed": seed}
    variances = None
    if prior_precision is not None:
        trained = gaussian_precision(run.model.prior, "reading the guide under another prior")
        w = settled_kl_weight(run)
        if prior_precision == "validation":
            validation = load_split(cfg, run.task, "validation", run.tokenizer, None)
            found = search_prior_precision(run.guide, validation, trained, kl_weight=w, model=run.model,
                                           batch_size=cfg.eval.batch_size, progress=progress)
            lam, chosen = found.prior_precision, found.variances
            facts["validation_nll"] = {f"{k:g}": v for k, v in found.validation_nll.items()}
        else:
            lam = float(prior_precision)
            check_real("prior_precision", lam, low=0, low_open=True)
            chosen = variances_at(data_precisions(scales, trained, w), lam)
        facts.update(prior_precision=prior_precision, chosen_prior_precision=lam, trained_prior_precision=trained,
                     trained_kl_weight=w)
        variances = [chosen]

    def predict(data: EncodedDataset) -> torch.Tensor:
        pyro.set_rng_seed(seed)
        return linearised_predict(run.guide, data, model=run.model, batch_size=cfg.eval.batch_size,
                                  variances=variances, progress=progress,
                                  mc_samples=GLM_MC_SAMPLES if predictive == "glm-mc" else None)

    return predict, facts


def evaluate_loaded(run: LoadedRun, task: TaskSpec, *, split: str = "test", samples: int | None = None,
                    limit: int | None = None, progress: bool = True, seed: int | None = None,
                    suffix: str = "") -> tuple[Metrics, torch.Tensor]:
    """Evaluate a loaded SVI run on ``task``/``split`` with its N-sample predictive (:func:`svi_predictor`)."""
    seed = run.config.seed if seed is None else seed
    predict, n = svi_predictor(run, samples=samples, seed=seed, progress=progress, desc=f"eval {task.name}")
    metrics, probs, _ = score(run, task, split, evaluation_limit(run.config, limit), predict, suffix,
                              extra={"samples": n, "seed": seed})
    return metrics, probs
