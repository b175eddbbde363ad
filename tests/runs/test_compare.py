"""``compare``: a plain fine-tune beside its Bayesian counterparts, each a run of its own; a rerun
reuses finished methods; presets are differences from the defaults."""

import json

import pytest
from click.testing import CliRunner

from pyro_llm.cli import cli
from pyro_llm.runs import COMPARE_METHODS, DEFAULT_METHODS, PRESETS, QUICK, SVIConfig, load_predictions


@pytest.fixture(scope="module")
def tiny_sst2(tmp_path_factory):
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-sst2"), task="sst2")


def test_compare_trains_every_method_once_and_prints_them_side_by_side(tiny_sst2, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_sst2), "--steps", "4", "--lr", "5e-2", "--eval-samples", "2",
            "--test-limit", "24", "--device", "cpu", "--methods", ",".join(COMPARE_METHODS), "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    table = json.loads((out / "comparison.json").read_text())
    assert sorted(table) == sorted(COMPARE_METHODS)
    assert (out / "reliability.png").stat().st_size > 0 and str(out / "reliability.png") in res.output
    for method in COMPARE_METHODS:
        assert f"| {method} |" in res.output
    # each method is a finished run with the same task, data and seed
    for run in ("map", "blob-adam", "blob-adam-ab", "laplace"):
        config = json.loads((out / run / "config.json").read_text())
        assert config["state"] == "finished" and config["run"]["task"] == "sst2"
        assert config["run"]["data"]["test_limit"] == 24 and config["run"]["data"]["split_fractions"] == list(
            QUICK["data"]["split_fractions"])
    assert json.loads((out / "blob-adam" / "config.json").read_text())["run"]["guide"]["name"] == "blob"
    assert json.loads((out / "map" / "config.json").read_text())["run"]["guide"]["name"] == "map"
    # the printed metrics are the runs' own recorded predictions
    probs, labels = load_predictions(out / "blob-adam", "sst2/test")
    assert len(labels) == 24 and table["blob-adam"]["n"] == 24
    # the A-and-B guide: B a site of the preset's guide, scored only by its linearised predictive
    # under the prior precision the validation split chose (no N-sample test pass)
    ab = json.loads((out / "blob-adam-ab" / "config.json").read_text())["run"]
    assert ab["b_site"] is True and ab["guide"]["name"] == "blob" and ab["objective"]["kl_weight"] == 0.1
    recorded = json.loads((out / "blob-adam-ab" / "metrics.json").read_text())
    assert "sst2/test" not in recorded
    row = recorded["sst2/test/glm-prior-validation"]
    assert row["predictive"] == "glm" and row["prior_precision"] == "validation" and row["chosen_prior_precision"] > 0
    probs, labels = load_predictions(out / "blob-adam-ab", "sst2/test/glm-prior-validation")
    assert len(labels) == 24 and table["blob-adam-ab"]["nll"] == pytest.approx(row["nll"])
    # a rerun reuses the finished runs (their files untouched) and prints the same table
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    assert json.loads((out / "comparison.json").read_text()) == table
    # other options on the same folder are refused, not silently mixed in
    other = CliRunner().invoke(cli, [*args[:-2], "--seed", "1", "--out", str(out)])
    assert other.exit_code != 0 and "--overwrite" in other.output


def test_presets_list_only_differences_from_the_defaults():
    defaults = SVIConfig().to_dict()
    for name, recipe in PRESETS.items():
        assert set(recipe) <= set(SVIConfig.SECTIONS), name
        for section, values in recipe.items():
            for key, value in values.items():
                assert key in defaults[section], (name, section, key)
                assert defaults[section][key] != value, f"preset {name} restates the default {section}.{key}"


def test_compare_runs_its_default_methods_one_training(tiny_sst2, tmp_path):
    """By default one model is trained (the MAP); its counterparts are post hoc (TS, Laplace)."""
    res = CliRunner().invoke(cli, ["compare", "--model", str(tiny_sst2), "--steps", "2", "--eval-samples", "2",
                                   "--test-limit", "8", "--device", "cpu", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert sorted(json.loads((tmp_path / "c" / "comparison.json").read_text())) == sorted(DEFAULT_METHODS)
    assert set(DEFAULT_METHODS) == {"map", "map+ts", "laplace"}
    assert (tmp_path / "c" / "laplace" / "laplace" / "guide.safetensors").is_file()
    assert not (tmp_path / "c" / "blob-adam").exists()
