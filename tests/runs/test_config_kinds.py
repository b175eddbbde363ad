"""One configuration per run kind, from shared sections: each run records exactly its kind's fields,
reloads as its kind's class, and run folders of earlier releases (one configuration for every kind,
``B``'s role in the model section, a Laplace section beside the run's) load as their kind."""

import json
from dataclasses import fields

import pytest

from pyro_llm.runs import (CONFIG_KINDS, LaplaceRunConfig, SVIConfig, ZeroShotConfig, laplace, run_config_of, train,
                           zero_shot)

DATA = {"train_limit": 8, "test_limit": 4, "max_length": 96}


def _recorded(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def test_each_run_kind_records_its_own_fields_and_reloads_as_its_kind(tiny_llama, tmp_path):
    svi = SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tiny_llama)}, "data": DATA, "b_site": True,
                               "eval": {"samples": 0, "batch_size": 2},
                               "optim": {"steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3}})
    train(svi, tmp_path / "svi", progress=False)
    lap = LaplaceRunConfig.like(svi, seed=svi.seed, laplace={"adapter": str(tmp_path / "svi"), "a_only": True,
                                                             "prior_precision": "1.0", "kfac": {"batch_size": 4}})
    laplace(lap, tmp_path / "laplace", progress=False)
    zero_shot(ZeroShotConfig.like(svi), tmp_path / "zs", progress=False)

    for name, cls in (("svi", SVIConfig), ("laplace", LaplaceRunConfig), ("zs", ZeroShotConfig)):
        raw = _recorded(tmp_path / name)
        assert raw["kind"] == cls.KIND and set(raw) == {"kind", "state", "run"}, name
        assert set(raw["run"]) == {f.name for f in fields(cls)}, name  # nothing another kind owns
        assert "b_site" not in raw["run"]["model"], name
        loaded = run_config_of(tmp_path / name)
        assert type(loaded) is cls and json.loads(json.dumps(loaded.to_dict())) == raw["run"], name
    assert set(_recorded(tmp_path / "zs")["run"]) == {"task", "model", "data", "eval"}
    assert _recorded(tmp_path / "svi")["run"]["b_site"] is True
    lap_run = _recorded(tmp_path / "laplace")["run"]
    assert lap_run["seed"] == 3 and lap_run["laplace"]["a_only"] is True  # the extent, said once
    assert lap_run["eval"]["batch_size"] == 2 and lap_run["laplace"]["kfac"]["batch_size"] == 4  # each its own
    assert run_config_of(tmp_path / "laplace").model_parts()[2] is False  # built with B a parameter


def _old_sections():
    """A run section as releases with one configuration for every kind wrote it."""
    return {"task": "arc-easy", "model": {"name": None, "device": "cpu", "dtype": "float32",
                                          "attn_implementation": None, "b_site": True},
            "data": {"train_limit": 8, "test_limit": 4, "max_length": 96, "split_seed": 0, "split_fractions": None},
            "eval": {"samples": 3, "batch_size": 2, "max_rows": 64, "ece_bins": 10}}


@pytest.mark.parametrize("kind", ["svi", "laplace", "zero-shot", "laplace-full", "svi-flat"])
def test_run_folders_of_earlier_releases_load_as_their_kind(tmp_path, kind):
    run = _old_sections()
    raw: dict = {"kind": kind.split("-")[0] if kind != "zero-shot" else kind, "state": "finished", "run": run}
    if kind == "svi":
        run.update(guide={"name": "blob"}, optim={"seed": 5, "steps": 7})
    elif kind.startswith("laplace"):
        run["optim"] = {"seed": 5}
        raw["laplace"] = {"adapter": "/a", "a_only": False, "prior_precision": "val-nll", "n_kfac": 3,
                          "batch_size": 2}  # the first releases' flat K-FAC keys
        if kind == "laplace-full":  # before the recorded sections: every section of the SVI run
            run.update(guide={"name": "map"}, objective={"kl_weight": 1.0}, prior={"scale": 0.05},
                       optim={"seed": 5, "steps": 100}, lora={"rank": 4})
    elif kind == "zero-shot":
        run["optim"] = {"seed": 0}
    else:  # the flat layout of the first releases
        raw["run"] = {"task": "arc-easy", "guide": "blob", "b_site": True, "rank": 4, "eval_samples": 3,
                      "prior_scale": 0.05}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    cfg = run_config_of(tmp_path)
    assert type(cfg) is CONFIG_KINDS[raw["kind"]]
    if isinstance(cfg, SVIConfig):
        assert cfg.b_site is True and cfg.guide.name == "blob" and cfg.eval.samples == 3
        if kind == "svi":
            assert cfg.optim.seed == 5 and cfg.optim.steps == 7
        else:
            assert cfg.lora.rank == 4 and cfg.prior.scale == 0.05
    elif isinstance(cfg, LaplaceRunConfig):
        assert cfg.seed == 5 and cfg.laplace.a_only is False and cfg.laplace.prior_precision == "val-nll"
        assert cfg.laplace.kfac.n_kfac == 3 and cfg.laplace.kfac.batch_size == 2 and cfg.eval.batch_size == 2
        assert cfg.model_parts()[2] is True
        if kind == "laplace-full":
            assert cfg.prior.scale == 0.05 and cfg.lora.rank == 4
    else:
        assert cfg.to_dict()["eval"]["ece_bins"] == 10 and cfg.seed == 0
