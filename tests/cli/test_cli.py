"""The click CLI on tiny models, and one end-to-end run on the real SmolLM2-135M."""

import json

import pytest
from click.testing import CliRunner

from pyro_llm.cli import cli


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


def test_help_shows_defaults():
    out = _run(["svi-train", "--help"]).output
    assert "--guide" in out and "[default: map]" in out and "--resume" in out


def test_tasks_lists_registry():
    out = _run(["tasks"]).output
    assert "arc-easy" in out and "mmlu-college-physics" in out and "sst2" in out


def test_svi_train_and_evaluate(tiny_llama, tmp_path):
    out = tmp_path / "run"
    args = ["svi-train", "--model", str(tiny_llama), "--task", "arc-easy", "--preset", "blob", "--steps", "3",
            "--train-limit", "16", "--test-limit", "8", "--eval-samples", "2", "--max-length", "96", "--out", str(out)]
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "ECE" in res.output and "NLL" in res.output
    cfg = json.loads((out / "config.json").read_text())["run"]
    assert cfg["guide"]["name"] == "blob" and cfg["objective"]["kl_schedule"] == "blob"
    assert cfg["optim"]["g_optimizer"] == "sgd" and cfg["optim"]["steps"] == 3  # the preset, then explicit options
    refused = _run(args)
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    res = _run(["evaluate", str(out), "--task", "arc-challenge", "--task", "openbookqa", "--limit", "8"])
    assert res.exit_code == 0, res.output
    assert "arc-challenge/test" in res.output and "openbookqa/test" in res.output


def test_zero_shot_equals_an_untrained_adapter(tiny_llama, tmp_path):
    res = _run(["zero-shot", "--model", str(tiny_llama), "--test-limit", "8", "--max-length", "64",
                "--out", str(tmp_path / "zs")])
    assert res.exit_code == 0, res.output
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())["arc-easy/test"]
    res = _run(["svi-train", "--model", str(tiny_llama), "--guide", "map", "--steps", "1", "--lr", "0",
                "--train-limit", "8", "--test-limit", "8", "--max-length", "64", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())["arc-easy/test"]
    assert m["nll"] == pytest.approx(zs["nll"], abs=1e-6) and m["accuracy"] == zs["accuracy"]


def test_bad_names_give_clear_errors(tmp_path):
    res = _run(["svi-train", "--task", "arc-eazy", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "unknown task 'arc-eazy'" in res.output and "arc-easy" in res.output
    res = _run(["svi-train", "--model", "no-such/model-xyz", "--out", str(tmp_path / "y"), "--steps", "1"])
    assert res.exit_code != 0 and "cannot load model 'no-such/model-xyz'" in res.output
    assert "smollm2-135m" in res.output


@pytest.mark.slow
def test_end_to_end_on_real_smollm2(tmp_path):
    """svi-train MAP on SmolLM2-135M (converted from the GGUF package), then evaluate OOD."""
    out = tmp_path / "smol"
    res = _run(["svi-train", "--task", "arc-easy", "--guide", "blob", "--steps", "4", "--train-limit", "16",
                "--test-limit", "8", "--eval-samples", "2", "--max-length", "128", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())["arc-easy/test"]
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 100
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 8
    res = _run(["evaluate", str(out), "--task", "mmlu-college-physics", "--limit", "4", "--samples", "2"])
    assert res.exit_code == 0 and "mmlu-college-physics/test" in res.output
