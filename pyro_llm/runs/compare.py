"""``pyro-llm compare``: a plain fine-tune and its Bayesian counterparts on the same data, side by side.

Each method is a run of its own under the output folder, made by the library's own run functions,
so every one can be evaluated, resumed or reused like any other run::

    OUT/map/          the MAP (Pyro's AutoDelta): the plain LoRA fine-tune with the prior as weight decay
    OUT/laplace/      Laplace-LoRA around OUT/map: K-FAC, prior precision by validation NLL, the
                      linearised predictive (post hoc: no second training)
    OUT/blob-adam/    BLoB's guide with the MAP's recipe (the ``blob-adam`` preset; asked for with
                      ``methods``: a second training)
    OUT/blob-adam-ab/ the same preset over ``A`` and ``B`` (``b_site``), scored by its linearised
                      predictive under the prior precision chosen on the validation split: what
                      calibrates tasks whose logits are sums over tokens (PIQA in cloze form)
    OUT/comparison.json, OUT/comparison.md, OUT/reliability.png

``map+ts`` is the MAP with its temperature fitted on the validation split: the cheap post-hoc
calibration any Bayesian method has to beat. A finished method is reused when the command is run
again with the same options (a killed comparison continues where it stopped); ``overwrite``
replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import get_task
from ..evaluation import Metrics, compute_metrics, plot_reliability
from ..io import atomic_write_json, atomic_write_text
from .common import load_predictions, read_config, read_metrics, run_config_of
from .config import LaplaceRunConfig, SVIConfig, preset_config
from .laplace import laplace
from .load import evaluate
from .svi import train

__all__ = ["COMPARE_METHODS", "DEFAULT_METHODS", "QUICK", "Comparison", "compare"]

#: The first look (``pyro-llm compare`` with no options): SmolLM2-135M as a sentiment classifier on
#: SST-2 cut into 87 training, 131 validation and 654 test sentences, 100 steps of 8 (9 epochs,
#: the over-fitting regime where a plain fine-tune is over-confident; the learning rate raised with
#: the steps cut from the calibration study's 150), evaluated on 200 of the test sentences.
QUICK: dict[str, Any] = {"task": "sst2", "model": {"name": "smollm2-135m"},
                         "data": {"split_fractions": (0.1, 0.15, 0.75), "max_length": 64, "test_limit": 200},
                         "optim": {"steps": 100, "batch_size": 8, "lr": 1.5e-3},
                         "eval": {"samples": 10}}

#: The methods, in the order they run and print (``map+ts`` and ``laplace`` need ``map``).
COMPARE_METHODS = ("map", "map+ts", "laplace", "blob-adam", "blob-adam-ab")
#: What ``compare`` runs unless told otherwise: one training (the MAP) and its two post-hoc
#: counterparts, temperature scaling and Laplace-LoRA; BLoB's guide trains a second model
DEFAULT_METHODS = ("map", "map+ts", "laplace")


@dataclass
class Comparison:
    """Each method's test metrics, and where the runs and the reliability diagram are."""

    metrics: dict[str, Metrics]
    out: Path
    diagram: Path

    def table(self) -> str:
        """The metrics as a Markdown table, one row per method."""
        rows = ["| method | accuracy % | ECE % | NLL | Brier |", "| --- | --- | --- | --- | --- |"]
        rows += [f"| {name} | {m.accuracy:.2f} | {m.ece:.2f} | {m.nll:.4f} | {m.brier:.4f} |"
                 for name, m in self.metrics.items()]
        return "\n".join(rows)


def _evaluated_once(run_dir: Path, key: str, tag: str, **options: Any) -> str:
    """``key/tag``: the run evaluated with ``options`` and recorded under it, unless it already is."""
    if f"{key}/{tag}" not in read_metrics(run_dir):
        evaluate(run_dir, record_as=tag, **options)
    return f"{key}/{tag}"


def _finished(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and read_config(run_dir).get("state") == "finished"


def _reuse_or_run(run_dir: Path, wanted: dict[str, Any] | None, overwrite: bool, make: Callable[[bool], None]) -> None:
    """Run ``make`` unless ``run_dir`` holds a finished run of the same configuration (``wanted``: the
    run section to compare; ``None``: any finished run); a different one is replaced only with
    ``overwrite``."""
    if _finished(run_dir) and not overwrite:
        if wanted is None or run_config_of(run_dir).to_dict() == wanted:
            return
        raise ValueError(f"{run_dir} holds a finished run of other options; pass --overwrite to replace it")
    make(overwrite)


def compare(cfg: SVIConfig, out: str | Path, methods: tuple[str, ...] = DEFAULT_METHODS, *, overwrite: bool = False,
            progress: bool = True, cache: str | None = None, log: Callable[[str], None] = print) -> Comparison:
    """Train and evaluate ``methods`` (:data:`COMPARE_METHODS`) with ``cfg``'s task, model, data,
    steps and seed, each in its own run folder under ``out``; write the table and one reliability
    diagram of all of them."""
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose among {', '.join(COMPARE_METHODS)}")
    needs_map = {"map+ts", "laplace"} & set(methods)
    methods = tuple(m for m in COMPARE_METHODS if m in methods or (m == "map" and needs_map))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task).name
    key = f"{task}/test"
    base = cfg.to_dict()
    results: dict[str, Metrics] = {}
    curves: dict[str, tuple[Any, Any]] = {}

    def record(name: str, run_dir: Path, record_key: str) -> None:
        probs, labels = load_predictions(run_dir, record_key)
        results[name] = compute_metrics(probs, labels, cfg.eval.ece_bins)
        curves[name] = (probs, labels)
        log(f"{name:10s} {results[name].summary()}")

    for method in methods:
        run_dir = out / method.replace("+ts", "")
        if method == "map":
            map_cfg = SVIConfig.from_dict({**base, "guide": {"name": "map"}})
            _reuse_or_run(run_dir, map_cfg.to_dict(), overwrite,
                          lambda ow: train(map_cfg, run_dir, overwrite=ow, progress=progress, cache=cache))
            record(method, run_dir, key)
        elif method == "map+ts":
            record(method, run_dir, _evaluated_once(run_dir, key, "temperature-validation", temperature="validation",
                                                    progress=progress, cache=cache))
        elif method == "blob-adam":
            bayes_cfg = preset_config("blob-adam", **{k: v for k, v in base.items() if k not in ("guide", "objective")})
            _reuse_or_run(run_dir, bayes_cfg.to_dict(), overwrite,
                          lambda ow: train(bayes_cfg, run_dir, overwrite=ow, progress=progress, cache=cache))
            record(method, run_dir, key)
        elif method == "blob-adam-ab":  # its N-sample test pass is skipped: the linearised one is its row
            ab_cfg = preset_config("blob-adam", b_site=True,
                                   **{k: v for k, v in base.items() if k not in ("guide", "objective", "b_site")})
            _reuse_or_run(run_dir, ab_cfg.to_dict(), overwrite,
                          lambda ow: train(ab_cfg, run_dir, overwrite=ow, progress=progress, cache=cache,
                                           evaluate_after=False))
            record(method, run_dir, _evaluated_once(run_dir, key, "glm-prior-validation", predictive="glm",
                                                    prior_precision="validation", progress=progress, cache=cache))
        else:  # laplace around the MAP
            lcfg = LaplaceRunConfig.like(cfg, seed=cfg.seed,
                                         laplace={"adapter": str(out / "map"), "prior_precision": "val-nll"})
            _reuse_or_run(run_dir, None, overwrite,
                          lambda ow: laplace(lcfg, run_dir, overwrite=ow, progress=progress, cache=cache))
            record(method, run_dir, key)
    comparison = Comparison(results, out, out / "reliability.png")
    plot_reliability(curves, comparison.diagram, n_bins=cfg.eval.ece_bins,
                     title=f"{task} test, {cfg.model.name or get_task(cfg.task).default_model}")
    atomic_write_json(out / "comparison.json", {name: m.as_dict() for name, m in results.items()})
    atomic_write_text(out / "comparison.md", comparison.table() + "\n")
    return comparison
