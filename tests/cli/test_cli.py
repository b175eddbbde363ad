"""The click CLI on tiny models, and one end-to-end run on the real SmolLM2-135M."""

import json

import pytest
import torch
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
    assert cfg["optim"]["split_kl"] and cfg["eval"]["flipout"] and cfg["lora"]["class_head"]
    refused = _run(args)
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    res = _run(["evaluate", str(out), "--task", "arc-challenge", "--task", "openbookqa", "--limit", "8"])
    assert res.exit_code == 0, res.output
    assert "arc-challenge/test" in res.output and "openbookqa/test" in res.output


def test_blob_adam_preset_trains_its_scales_by_adamw(tiny_llama, tmp_path):
    import pyro

    from pyro_llm.infer import SVITrainer
    from pyro_llm.runs import preset_config
    from pyro_llm.runs.registry import ELBOS

    cfg = preset_config("blob-adam", task="arc-easy", model={"name": str(tiny_llama)},
                        optim={"steps": 2, "batch_size": 4, "lr": 1e-2})
    assert cfg.objective.kl_weight == 0.1 and cfg.optim.g_optimizer == "adamw" and cfg.guide.name == "blob"
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import build_model

    task = get_task("arc-easy")
    model, tok = build_model(str(tiny_llama), task, dataset_size=16)
    data = encode_examples(load_examples(task, "train", limit=16), tok, task.num_classes, 64)
    guide = cfg.guide.build(model)
    trainer = SVITrainer(model, guide, cfg.optim, elbo=ELBOS[cfg.objective.elbo](),
                         kl_schedule=cfg.objective.kl(16, 4, 2), progress=False)
    trainer.fit(data)
    store = dict(pyro.get_param_store().named_parameters())
    scale_opt = trainer.optimizers[1]
    assert isinstance(scale_opt, torch.optim.AdamW)
    assert [p for g in scale_opt.param_groups for p in g["params"]] == [store["blob.G"]]
    assert trainer.kl_schedule(0) == 0.1


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
