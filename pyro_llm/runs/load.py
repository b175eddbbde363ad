"""Any saved run, by the kind its ``config.json`` names: load it, evaluate it."""

from __future__ import annotations

from pathlib import Path

from ..checks import check_int
from ..data import get_task
from ..evaluation import Metrics
from .common import LoadedRun, read_config
from .laplace import LaplaceRun, load_laplace_run
from .registry import PREDICTIVES, lookup
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
             cache: str | None = None, predictive: str | None = None, seed: int | None = None,
             record_as: str | None = None) -> Metrics:
    """Evaluate a saved run (SVI or Laplace) on ``task`` (default: its training task).

    Every random draw comes from ``seed`` (default: the run's), so a repeated call gives the same
    numbers. The result is recorded in ``metrics.json`` under ``<task>/<split>/evaluate-<options>``,
    beside the metrics written at training time, never over them; ``record_as`` replaces the
    ``evaluate-<options>`` part (``""``: under ``<task>/<split>``, as training records its own task)."""
    check_int("seed", seed, low=0, optional=True)
    check_int("samples", samples, low=0, optional=True)
    check_int("limit", limit, low=1, optional=True)
    run = load_run(run_dir, device=device, cache=cache)
    spec = get_task(task) if task else run.task
    seed = run.config.optim.seed if seed is None else seed
    if isinstance(run, LaplaceRun):
        kind = predictive or run.lconfig.predictive
        lookup(PREDICTIVES, kind, "predictive")
        n = f"-n{run.config.eval.samples if samples is None else samples}" if kind == "nn" else ""
        tag = f"evaluate-{kind}{n}-seed{seed}" if record_as is None else record_as
        return run.evaluate(spec, split=split, limit=limit, progress=progress, predictive=kind, samples=samples,
                            seed=seed, suffix=f"/{tag}" if tag else "")
    if predictive is not None:
        raise ValueError(f"--predictive chooses among a Laplace run's predictives; {run_dir} is an SVI run "
                         "(its predictive is the N-sample average: use --samples)")
    n = run.config.eval.samples if samples is None else samples
    tag = f"evaluate-n{n}-seed{seed}" if record_as is None else record_as
    return evaluate_loaded(run, spec, split=split, samples=n, limit=limit, progress=progress, seed=seed,
                           suffix=f"/{tag}" if tag else "")[0]
