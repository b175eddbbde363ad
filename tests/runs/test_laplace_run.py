"""A Laplace run describes the model it built: the adapter's LoRA and the prior of the run that trained it."""

import json

import pytest

from pyro_llm.runs import LaplaceRunConfig, SVIConfig, evaluate, laplace, train


def _map_cfg(tiny_llama, prior_scale):
    return SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tiny_llama)}, "guide": {"name": "map"},
                                "prior": {"scale": prior_scale}, "lora": {"rank": 4, "alpha": 8.0},
                                "data": {"train_limit": 16, "test_limit": 8, "max_length": 96},
                                "eval": {"samples": 0},
                                "optim": {"steps": 3, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 3}})


def _laplace_cfg(adapter, **laplace_options):
    return LaplaceRunConfig.from_dict({"task": "arc-easy",
                                       "data": {"train_limit": 16, "test_limit": 8, "max_length": 96},
                                       "laplace": {"adapter": str(adapter), **laplace_options}})


def test_laplace_run_uses_and_records_its_adapter_runs_prior_and_lora(tiny_llama, tmp_path):
    train(_map_cfg(tiny_llama, 0.05), tmp_path / "map", progress=False)
    result = laplace(_laplace_cfg(tmp_path / "map", prior_precision="prior"), tmp_path / "laplace", progress=False)
    assert result["prior_precision"] == pytest.approx(400.0, rel=1e-5)  # 1 / 0.05^2, not the default's 25

    recorded = json.loads((tmp_path / "laplace" / "config.json").read_text())["run"]
    assert recorded["prior"] == {"name": "gaussian", "scale": 0.05}
    assert (recorded["lora"]["rank"], recorded["lora"]["alpha"]) == (4, 8.0)
    assert recorded["laplace"]["a_only"] is False  # A and B are the posterior's sites, said once
    assert "b_site" not in recorded and "b_site" not in recorded["model"]
    assert "guide" not in recorded and "objective" not in recorded and "optim" not in recorded  # it trains nothing
    assert recorded["seed"] == 0

    # the evidence search starts from the prior's precision too: the same run with marglik differs
    marglik = laplace(_laplace_cfg(tmp_path / "map"), tmp_path / "marglik", progress=False)
    assert marglik["prior_precision"] != pytest.approx(400.0, rel=1e-3)
    # and the run reloads as it was built (same metrics from its saved files)
    again = evaluate(tmp_path / "laplace", progress=False)
    assert again.nll == pytest.approx(result["arc-easy/test"]["nll"], rel=1e-5)


def test_a_only_laplace_records_b_as_a_parameter(tiny_llama, tmp_path):
    train(_map_cfg(tiny_llama, 0.1), tmp_path / "map", progress=False)
    result = laplace(_laplace_cfg(tmp_path / "map", prior_precision="prior", a_only=True), tmp_path / "laplace",
                     progress=False)
    assert result["prior_precision"] == pytest.approx(100.0, rel=1e-5)
    recorded = json.loads((tmp_path / "laplace" / "config.json").read_text())["run"]
    assert recorded["laplace"]["a_only"] is True and recorded["prior"]["scale"] == 0.1
