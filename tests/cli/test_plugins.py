"""A guide or prior written in user code trains from the command line, named as
``package.module:Class`` or declared by an installed package's entry points; the console script
loads it in a fresh process (no test-only registration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from safetensors.torch import load_file

PLUGIN = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_llm.priors import GaussianPrior


    class SharedScaleGuide:
        """A Normal per LoRA site around a mean started at zero, with one learnt log-scale per site."""

        def __init__(self, model):
            self.model = model

        def __call__(self, *args, **kwargs):
            for s in self.model.sites:
                loc = pyro.param(f"mine.{s.name}.loc", lambda: torch.zeros(s.shape))
                log_scale = pyro.param(f"mine.{s.name}.log_scale", lambda: torch.tensor(-5.0))
                pyro.sample(s.name, dist.Normal(loc, log_scale.exp().expand(loc.shape)).to_event(2))

        def median(self, *args, **kwargs):
            return {s.name: pyro.param(f"mine.{s.name}.loc").detach() for s in self.model.sites}

        def param_groups(self):
            return {"scale": [pyro.param(f"mine.{s.name}.log_scale") for s in self.model.sites]}


    def wide_prior(scale):
        return GaussianPrior(10 * scale)
''')


def _cli(args, path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pyro_llm.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def _train(tmp_path, tiny_llama, path, *options):
    out = tmp_path / "run"
    res = _cli(["svi-train", "--model", str(tiny_llama), *options, "--steps", "4", "--lr", "5e-2",
                "--batch-size", "4", "--train-limit", "8", "--test-limit", "4", "--max-length", "64",
                "--eval-samples", "2", "--device", "cpu", "--out", str(out)], path)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _check_trained(run):
    params = load_file(str(run / "guide.safetensors"))
    locs = [v for k, v in params.items() if k.startswith("mine.") and k.endswith(".loc")]
    scales = [v for k, v in params.items() if k.startswith("mine.") and k.endswith(".log_scale")]
    assert locs and len(locs) == len(scales)
    assert all(bool(v.abs().sum() > 0) for v in locs)  # every site's mean left its zero start
    assert all(float(v) != -5.0 for v in scales)  # and every scale moved, through the scale optimiser
    assert "arc-easy/test" in json.loads((run / "metrics.json").read_text())


def test_a_guide_named_module_colon_class_trains_from_the_cli(tmp_path, tiny_llama):
    (tmp_path / "myguides.py").write_text(PLUGIN)
    run = _train(tmp_path, tiny_llama, tmp_path, "--guide", "myguides:SharedScaleGuide",
                 "--prior", "myguides:wide_prior")
    _check_trained(run)
    config = json.loads((run / "config.json").read_text())["run"]
    assert config["guide"]["name"] == "myguides:SharedScaleGuide" and config["prior"]["name"] == "myguides:wide_prior"
    res = _cli(["evaluate", str(run), "--limit", "4"], tmp_path)  # the run reloads with its plugin guide
    assert res.returncode == 0 and "accuracy" in res.stdout, res.stderr[-2000:]


def test_an_installed_packages_entry_points_add_cli_choices(tmp_path, tiny_llama):
    site = tmp_path / "site"
    (site / "myguides_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "myguides.py").write_text(PLUGIN)
    (site / "myguides_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: myguides-plugin\nVersion: 0.1\n")
    (site / "myguides_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[pyro_llm.guides]\nshared-scale = myguides:SharedScaleGuide\n\n[pyro_llm.priors]\nwide = myguides:wide_prior\n")
    res = _cli(["svi-train", "--help"], site)
    assert res.returncode == 0 and "shared-scale" in res.stdout and "wide" in res.stdout
    run = _train(tmp_path, tiny_llama, site, "--guide", "shared-scale", "--prior", "wide")
    _check_trained(run)


def test_an_unknown_guide_is_one_clear_error(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from pyro_llm.cli import cli

    for name, message in (("nosuchmodule:Guide", "cannot import 'nosuchmodule:Guide'"), ("nosuch", "unknown guide 'nosuch'")):
        res = CliRunner().invoke(cli, ["svi-train", "--model", str(tiny_llama), "--guide", name, "--out",
                                       str(tmp_path / "x")])
        assert res.exit_code != 0 and message in res.output, res.output
        assert not (tmp_path / "x").exists()
