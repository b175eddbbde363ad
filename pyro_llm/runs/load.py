"""Any saved run, by the kind its ``config.json`` names: load it, evaluate it (optionally
temperature-scaled on its validation split), or evaluate several as an ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pyro
import torch

from ..checks import MAX_SEED, check_int, check_real
from ..data import EncodedDataset, TaskSpec, get_task
from ..evaluation import Metrics, compute_metrics, fit_temperature_to_probs, temper
from ..io import CorruptFileError, atomic_write_json, read_json
from .common import (LoadedRun, evaluation_limit, load_split, read_config, recorded_predictions, retarget_head,
                     run_config_of, score)
from .laplace import LaplaceRun, load_laplace_run
from .svi import SVI_PREDICTIVES, linearised_predictor, load_svi_run, svi_predictor
from .config import ZeroShotConfig
from .zero_shot import load_zero_shot_run, zero_shot_predictor

__all__ = ["evaluate", "evaluate_ensemble", "load_run", "predictor"]

Run = LoadedRun | LaplaceRun
Predict = Callable[[EncodedDataset], torch.Tensor]


def load_run(run_dir: str | Path, *, device: str | None = None, cache: str | None = None) -> Run:
    """Rebuild a saved SVI, Laplace or zero-shot run (safetensors only)."""
    run_dir = Path(run_dir)
    kind = read_config(run_dir).get("kind")
    loaders = {"laplace": load_laplace_run, "svi": load_svi_run, "zero-shot": load_zero_shot_run}
    if kind not in loaders:
        raise ValueError(f"{run_dir}/config.json names the run kind {kind!r}; expected one of {', '.join(loaders)}")
    return loaders[kind](run_dir, device=device, cache=cache)


def predictor(run: Run, *, samples: int | None = None, predictive: str | None = None, seed: int | None = None,
              prior_precision: str | float | None = None, progress: bool = True) -> tuple[Predict, str, dict[str, Any]]:
    """``(predict, tag, facts)``: the run's predictive as ``predict(data) -> probs`` (reproducible:
    every call draws from ``seed``, default the run's), a tag naming its options, and the facts
    to record beside its metrics."""
    check_int("seed", seed, low=0, high=MAX_SEED, optional=True)
    seed = run.config.seed if seed is None else seed
    if prior_precision is not None and (isinstance(run, LaplaceRun) or predictive in (None, "nn")):
        raise ValueError("--prior-precision reads an SVI run's guide under another prior, for its linearised "
                         "predictive (--predictive glm or glm-mc); a Laplace run's is chosen by `pyro-llm laplace`")
    if isinstance(run, LaplaceRun):
        n = run.config.eval.samples if samples is None else samples
        check_int("samples", n, low=0)
        predict, facts = run.predictor(predictive, n, seed, progress)
        kind = facts["predictive"]
        return predict, f"{kind}{f'-n{n}' if kind == 'nn' else ''}-seed{seed}", facts
    if isinstance(run.config, ZeroShotConfig):  # the base model: one deterministic pass
        if predictive is not None:
            raise ValueError(f"--predictive chooses among a trained run's predictives; {run.run_dir} is a zero-shot "
                             "run (the base model's one pass)")
        return zero_shot_predictor(run, progress=progress), f"n0-seed{seed}", {"samples": 0, "seed": seed}
    if predictive not in (None, *SVI_PREDICTIVES):
        raise ValueError(f"an SVI run's predictive is one of {', '.join(SVI_PREDICTIVES)}; got {predictive!r}")
    if predictive not in (None, "nn"):  # an SVI run's linearised predictive
        if samples is not None:
            raise ValueError(f"--samples applies to the N-sample predictive, not to --predictive {predictive}")
        predict, facts = linearised_predictor(run, predictive=predictive, prior_precision=prior_precision, seed=seed,
                                              progress=progress)
        prior = "" if prior_precision is None else "-prior" + (
            "val" if prior_precision == "validation" else f"{float(prior_precision):g}")
        return predict, f"{predictive}{prior}-seed{seed}", facts
    predict, n = svi_predictor(run, samples=samples, seed=seed, progress=progress)
    return predict, f"n{n}-seed{seed}", {"samples": n, "seed": seed}


def _temperature(run: Run, predict: Predict, temperature: str | float, limit: int | None, tag: str,
                 facts: dict[str, Any]) -> float:
    """A fixed ``T``, or the one fitted on the run's own task's validation split.

    The validation predictions are recorded (``<task>/validation/evaluate-<tag>``) and reused by
    the next tempered evaluation with the same draws and limit, e.g. on another test set: an
    N-sample predictive over the validation split is made once per run, not once per evaluation.
    ``T`` is fitted to the recorded (float32) probabilities, so a reuse gives the same ``T``."""
    if temperature != "validation":
        value = float(temperature)
        check_real("temperature", value, low=0, low_open=True)
        return value
    recorded = recorded_predictions(run.run_dir, run.task, "validation", facts, limit)
    if recorded is None:
        _, probs, labels = score(run, run.task, "validation", limit, lambda data: predict(data).float(),
                                 f"/evaluate-{tag}", facts)
        recorded = (probs, labels)
    return fit_temperature_to_probs(*recorded)


def _reusing(predict: Predict, recorded: tuple[torch.Tensor, torch.Tensor] | None) -> Predict:
    """``predict``, answering from ``recorded`` ``(probs, labels)`` (an earlier evaluation's, with the
    same draws on the same examples) when asked for examples with those labels."""
    if recorded is None:
        return predict
    return lambda data: recorded[0] if torch.equal(recorded[1], data.labels) else predict(data)


def evaluate(run_dir: str | Path, task: str | None = None, *, split: str = "test", samples: int | None = None,
             limit: int | None = None, device: str | None = None, progress: bool = True,
             cache: str | None = None, predictive: str | None = None, seed: int | None = None,
             temperature: str | float | None = None, validation_limit: int | None = None,
             prior_precision: str | float | None = None, record_as: str | None = None) -> Metrics:
    """Evaluate a saved run (SVI, Laplace or zero-shot) on ``task`` (default: its training task).

    :param prior_precision: with ``predictive`` ``"glm"``/``"glm-mc"`` on an SVI run, its guide read
        under the Gaussian prior of this precision, or ``"validation"``: chosen on the run's
        validation split (:func:`~pyro_llm.runs.svi.linearised_predictor`).
    :param temperature: ``"validation"`` fits ``T`` (:func:`~pyro_llm.evaluation.fit_temperature_to_probs`)
        on the run's own task's validation split (a seeded subset of ``validation_limit`` examples, or
        all of it), a number fixes it; the predictive is then ``p^(1/T)``, applied to the predictions an
        earlier evaluation recorded with the same draws on the same examples when there are some
        (:func:`~pyro_llm.runs.common.recorded_predictions`; training records its own), else to new ones.

    Every random draw comes from ``seed`` (default: the run's), so a repeated call gives the same
    numbers. The result is recorded in ``metrics.json`` under ``<task>/<split>/evaluate-<options>``
    (a ``limit`` other than the run's own test limit among the options), beside the metrics written
    at training time, never over them; ``record_as`` replaces the
    ``evaluate-<options>`` part (``""``: under ``<task>/<split>``, as training records its own task)."""
    check_int("samples", samples, low=0, optional=True)
    check_int("limit", limit, low=1, optional=True)
    check_int("validation_limit", validation_limit, low=1, optional=True)
    if temperature is not None and temperature != "validation":
        check_real("temperature", float(temperature), low=0, low_open=True)
    run = load_run(run_dir, device=device, cache=cache)
    spec = get_task(task) if task else run.task
    given = limit
    limit = evaluation_limit(run.config, limit)  # the examples read, recorded and reused
    predict, tag, facts = predictor(run, samples=samples, predictive=predictive, seed=seed,
                                    prior_precision=prior_precision, progress=progress)
    if given is not None and given != run.config.data.test_limit:  # other examples: their own entry
        tag += f"-limit{given}"
    if temperature is not None:
        T = _temperature(run, predict, temperature, validation_limit, tag, facts)
        # the same draws on the same examples, already recorded (e.g. at the end of training), are reused
        untempered = _reusing(predict, recorded_predictions(run.run_dir, spec, split, facts, limit))

        def predict(data: EncodedDataset) -> torch.Tensor:
            return temper(untempered(data), T)

        tag += "-Tval" if temperature == "validation" else f"-T{T:g}"
        facts = {**facts, "temperature": T}
    tag = f"evaluate-{tag}" if record_as is None else record_as
    metrics, _, _ = score(run, spec, split, limit, predict, f"/{tag}" if tag else "", facts)
    return metrics


def evaluate_ensemble(run_dirs: Sequence[str | Path], task: str | None = None, *, split: str = "test",
                      samples: int | None = None, limit: int | None = None, device: str | None = None,
                      progress: bool = True, cache: str | None = None, seed: int | None = None,
                      out: str | Path | None = None) -> Metrics:
    """The ensemble of saved runs: their predictive probabilities averaged, example by example.

    The runs are loaded one at a time (one model in memory); all are scored on the same examples
    (the first run's split seed and length), which must carry the same labels. A member whose data
    settings are the first's and that recorded an evaluation of these examples with the same draws
    (training records its own test split) contributes those predictions instead of predicting
    again. With ``out`` the metrics and members are written to that JSON file; the runs' folders
    are not touched."""
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    check_int("limit", limit, low=1, optional=True)
    if out is not None:
        _check_ensemble_out(Path(out), [Path(d) for d in run_dirs])
    total: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    first = None
    spec: TaskSpec | None = None
    for run_dir in run_dirs:
        pyro.clear_param_store()
        run = load_run(run_dir, device=device, cache=cache)
        first = first or run.config
        spec = spec or (get_task(task) if task else run.task)
        retarget_head(run, spec)
        read = limit if limit is not None else first.data.test_limit
        data = load_split(first, spec, split, run.tokenizer, read)
        if labels is not None and not torch.equal(labels, data.labels):
            raise ValueError(f"{run_dir} sees other examples or labels than {run_dirs[0]} on {spec.name}/{split}")
        labels = data.labels
        predict, _, facts = predictor(run, samples=samples, seed=seed, progress=progress)
        # the member's own evaluation of these examples with the same draws, when it recorded one
        if run.config.data == first.data:
            predict = _reusing(predict, recorded_predictions(run.run_dir, spec, split, facts, read))
        probs = predict(data).double()
        total = probs if total is None else total + probs
        del run
    assert total is not None and labels is not None and first is not None and spec is not None
    metrics = compute_metrics(total / len(run_dirs), labels, n_bins=first.eval.ece_bins)
    if out is not None:
        atomic_write_json(out, {"ensemble": [str(d) for d in run_dirs], "task": spec.name, "split": split,
                                "metrics": metrics.as_dict()})
    return metrics


def _check_ensemble_out(out: Path, run_dirs: list[Path]) -> None:
    """The ensemble's ``--out`` may not lie inside a member run or its base model's folder, and may
    replace only an earlier ensemble result (a JSON file with an ``ensemble`` entry)."""
    here = out.resolve()
    inputs = list(run_dirs)
    for d in run_dirs:
        name = run_config_of(d).model.name
        if name and Path(name).exists():
            inputs.append(Path(name))
    for item in inputs:
        if item.resolve() == here or item.resolve() in here.parents:
            raise ValueError(f"--out {out} lies inside the input {item}; write the ensemble's result elsewhere")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a JSON file")
    if out.exists():
        try:
            ours = "ensemble" in read_json(out)
        except (CorruptFileError, OSError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {out} exists and is not an ensemble result pyro-llm wrote; it is left untouched")


__all__ += ["Run"]
