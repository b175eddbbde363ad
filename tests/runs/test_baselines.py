"""The baselines as library features: temperature scaling fitted on the validation split of any run
(SVI, Laplace, zero-shot), an ensemble of runs, MC dropout, and BLoB's scale statistics; each from
the Python API and the CLI, checked against an independent computation of the same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pyro_llm.cli import cli
from pyro_llm.evaluation import compute_metrics, fit_temperature_to_probs, temper
from pyro_llm.io import atomic_save_tensors, load_tensors
from pyro_llm.runs import SVIConfig, ZeroShotConfig, evaluate, evaluate_ensemble, train, zero_shot


def _cfg(tiny_llama, guide, seed=0, **sections):
    return SVIConfig.from_dict({"model": {"name": str(tiny_llama)}, "guide": {"name": guide},
                                "data": {"train_limit": 24, "test_limit": 16, "max_length": 96},
                                "eval": {"samples": 3},
                                "optim": {"steps": 4, "batch_size": 4, "lr": 1e-2, "seed": seed}, **sections})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("baselines")
    made = {}
    for name, guide, seed, extra in (("map0", "map", 0, {}), ("map1", "map", 1, {}), ("blob", "blob", 0, {}),
                                     ("mcd", "map", 0, {"lora": {"dropout": 0.3}})):
        train(_cfg(tiny_llama, guide, seed, **extra), root / name, progress=False)
        made[name] = root / name
    zero_shot(ZeroShotConfig.from_dict({"model": {"name": str(tiny_llama)},
                                        "data": {"test_limit": 16, "max_length": 96}}), root / "zs", progress=False)
    made["zs"] = root / "zs"
    return made


def _saved(run_dir, key):
    t = load_tensors(run_dir / "predictions" / f"{key.replace('/', '_')}.safetensors")
    return t["probs"], t["labels"]


@pytest.mark.parametrize("name", ["map0", "blob", "zs"])
def test_temperature_scaling_fitted_on_validation(runs, name):
    run_dir = runs[name]
    plain = evaluate(run_dir, progress=False, limit=16)
    tempered = evaluate(run_dir, progress=False, limit=16, temperature="validation")
    table = json.loads((run_dir / "metrics.json").read_text())
    entry = next(v for k, v in table.items() if k.startswith("arc-easy/test/evaluate-") and k.endswith("-Tval"))
    T = entry["temperature"]
    assert T != 1.0 and 1e-2 <= T <= 1e2
    assert tempered.accuracy == plain.accuracy  # a temperature keeps every argmax
    # independently: T from the validation predictions, applied to the saved test predictions
    val = evaluate(run_dir, split="validation", limit=10 ** 6, progress=False, record_as="val-check")  # all of it
    val_probs, val_labels = _saved(run_dir, "arc-easy/validation/val-check")
    assert val.n == len(val_labels)
    assert abs(fit_temperature_to_probs(val_probs, val_labels) - T) <= 1e-6 * T
    test_key = next(k for k in table if k.startswith("arc-easy/test/evaluate-") and not k.endswith("-Tval"))
    test_probs, test_labels = _saved(run_dir, test_key)
    ref = compute_metrics(temper(test_probs, T), test_labels)
    assert abs(ref.nll - tempered.nll) <= 1e-5 and abs(ref.ece - tempered.ece) <= 1e-3


def test_tempered_evaluation_reuses_the_recorded_draws(runs):
    """A tempered evaluation tempers the predictions already recorded with the same draws on the same
    examples instead of predicting again: planted predictions must come back tempered."""
    run_dir = runs["blob"]
    evaluate(run_dir, progress=False, limit=16, seed=7, record_as="reuse-check")
    file = run_dir / "predictions" / "arc-easy_test_reuse-check.safetensors"
    probs, labels = _saved(run_dir, "arc-easy/test/reuse-check")
    planted = probs.roll(1, dims=0)  # valid distributions, no longer this run's predictions
    assert not torch.allclose(planted, probs)
    atomic_save_tensors(file, {"probs": planted, "labels": labels})
    tempered = evaluate(run_dir, progress=False, limit=16, seed=7, temperature="validation")
    table = json.loads((run_dir / "metrics.json").read_text())
    T = table["arc-easy/test/evaluate-n3-seed7-Tval"]["temperature"]
    ref = compute_metrics(temper(planted, T), labels)
    assert abs(tempered.nll - ref.nll) <= 1e-6 and tempered.accuracy == ref.accuracy
    # other draws (another seed) were never recorded: predicted afresh, not the planted ones
    other = evaluate(run_dir, progress=False, limit=16, seed=8, temperature="validation")
    fresh, _ = _saved(run_dir, "arc-easy/test/evaluate-n3-seed8-Tval")
    T8 = json.loads((run_dir / "metrics.json").read_text())["arc-easy/test/evaluate-n3-seed8-Tval"]["temperature"]
    assert other.n == 16 and not torch.allclose(fresh, temper(planted, T8).float(), atol=1e-4)


def test_tempered_evaluations_share_one_validation_pass(runs):
    """The validation predictions a fitted temperature comes from are recorded and reused by the next
    tempered evaluation with the same draws (here on another test set): planted validation
    predictions must set the second evaluation's temperature."""
    run_dir = runs["blob"]
    evaluate(run_dir, progress=False, limit=16, seed=11, temperature="validation")
    table = json.loads((run_dir / "metrics.json").read_text())
    key = "arc-easy/validation/evaluate-n3-seed11"
    T = table["arc-easy/test/evaluate-n3-seed11-Tval"]["temperature"]
    probs, labels = _saved(run_dir, key)
    assert table[key]["n"] == len(labels) and abs(fit_temperature_to_probs(probs, labels) - T) <= 1e-9 * T
    planted = probs.roll(1, dims=0)
    atomic_save_tensors(run_dir / "predictions" / "arc-easy_validation_evaluate-n3-seed11.safetensors",
                        {"probs": planted, "labels": labels})
    evaluate(run_dir, "openbookqa", progress=False, limit=8, seed=11, temperature="validation")
    again = json.loads((run_dir / "metrics.json").read_text())["openbookqa/test/evaluate-n3-seed11-limit8-Tval"]
    assert again["temperature"] == pytest.approx(fit_temperature_to_probs(planted, labels), rel=1e-9)
    assert again["temperature"] != pytest.approx(T, rel=1e-3)


def test_ensemble_averages_the_members_predictions(runs, tmp_path):
    members = [runs["map0"], runs["map1"]]
    probs = []
    for d in members:
        evaluate(d, progress=False, limit=16, record_as="ens-check")
        probs.append(_saved(d, "arc-easy/test/ens-check"))
    out = tmp_path / "ensemble.json"
    m = evaluate_ensemble(members, progress=False, limit=16, out=out)
    ref = compute_metrics((probs[0][0].double() + probs[1][0].double()) / 2, probs[0][1])
    assert abs(m.nll - ref.nll) <= 1e-6 and m.accuracy == ref.accuracy
    assert json.loads(out.read_text())["metrics"]["n"] == 16
    res = CliRunner().invoke(cli, ["evaluate", *map(str, members), "--limit", "16"])
    assert res.exit_code == 0 and "ensemble of 2" in res.output, res.output


def test_ensemble_reuses_the_members_recorded_predictions(runs):
    """A member that recorded an evaluation of the same examples with the same draws contributes
    those predictions: planted predictions (classes rolled) must set the ensemble's metrics."""
    members = [runs["map0"], runs["map1"]]
    for d in members:
        evaluate(d, progress=False, limit=12, record_as="reuse-check")
    (p0, labels), (p1, _) = (_saved(d, "arc-easy/test/reuse-check") for d in members)
    planted = p0.roll(1, dims=1)
    atomic_save_tensors(members[0] / "predictions" / "arc-easy_test_reuse-check.safetensors",
                        {"probs": planted, "labels": labels})
    m = evaluate_ensemble(members, progress=False, limit=12)
    ref = compute_metrics((planted.double() + p1.double()) / 2, labels)
    assert abs(m.nll - ref.nll) <= 1e-6 and m.accuracy == ref.accuracy
    assert abs(m.nll - compute_metrics((p0.double() + p1.double()) / 2, labels).nll) > 1e-3


def test_mc_dropout_samples_vary_and_blob_reports_its_scales(runs):
    one = evaluate(runs["mcd"], samples=1, progress=False, limit=16, seed=0)
    other = evaluate(runs["mcd"], samples=1, progress=False, limit=16, seed=1)
    assert one.nll != other.nll  # the dropout masks are the samples
    scales = json.loads((runs["blob"] / "scales.json").read_text())
    assert scales["all sites"]["min"] > 0 and len(scales) == 1 + 4  # four sites of the tiny Llama, and all
    assert not (runs["map0"] / "scales.json").exists()  # a point guide has no scales
    history = json.loads((runs["blob"] / "history.json").read_text())
    assert all({"nll", "kl", "kl_weight"} <= set(h) for h in history)


def test_cli_temperature_option(runs):
    res = CliRunner().invoke(cli, ["evaluate", str(runs["map0"]), "--temperature", "validation", "--limit", "8"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["evaluate", str(runs["map0"]), "--temperature", "-2"])
    assert res.exit_code == 2 and "positive number" in res.output
