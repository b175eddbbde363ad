"""Every guide the CLI offers goes the whole way from the command line: ``svi-train`` finishes
(state ``finished``, metrics recorded), ``evaluate`` reloads and scores it, ``laplace`` fits on its
adapter, and it joins an ensemble. A guide listed by ``--guide`` that crashes anywhere fails here."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pyro_llm.cli import cli
from pyro_llm.runs.registry import GUIDES

COMMON = ["--train-limit", "16", "--test-limit", "4", "--max-length", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def map_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("map") / "run"
    res = CliRunner().invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", "map", "--steps", "3",
                                   *COMMON, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_every_cli_guide_trains_evaluates_fits_laplace_and_ensembles(tmp_path, tiny_llama, map_run, guide):
    runner = CliRunner()
    run = tmp_path / guide
    res = runner.invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", guide, "--steps", "3",
                              "--lr", "1e-2", "--eval-samples", "2", *COMMON, "--out", str(run)])
    assert res.exit_code == 0, res.output
    config = json.loads((run / "config.json").read_text())
    assert config["state"] == "finished" and config["run"]["guide"]["name"] == guide
    assert "arc-easy/test" in json.loads((run / "metrics.json").read_text())
    res = runner.invoke(cli, ["evaluate", str(run), "--limit", "4"])
    assert res.exit_code == 0 and "accuracy" in res.output, res.output
    res = runner.invoke(cli, ["laplace", "--adapter", str(run), *COMMON[:2], *COMMON[4:],
                              "--prior-precision", "1.0", "--out", str(tmp_path / "laplace")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "ensemble.json"
    res = runner.invoke(cli, ["evaluate", str(run), str(map_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["metrics"]["n"] == 4
