"""Training loop, checkpoints, resume, faults."""

import json

import pyro
import pytest
import torch

from pyro_llm.runs import SVIConfig
from pyro_llm.infer import NonFiniteLossError, OptimConfig, SVITrainer
from pyro_llm.io import CorruptFileError
from pyro_llm.runs import RunDirExistsError, evaluate, load_run, train


def _cfg(tiny_llama, guide="blob", steps=6, **kw):
    return SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tiny_llama)}, "guide": {"name": guide},
                                "data": {"train_limit": 24, "test_limit": 16, "max_length": 96},
                                "eval": {"samples": 3},
                                "optim": {"steps": steps, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 3}, **kw})


def _params(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "guide.safetensors"))


@pytest.mark.parametrize("guide", ["blob", "map", "ivon"])  # ivon: its own optimiser's Hessian state too
def test_resume_gives_the_uninterrupted_result(tiny_llama, tmp_path, guide):
    cfg = _cfg(tiny_llama, guide)
    train(cfg, tmp_path / "full", progress=False, evaluate_after=False)
    full = _params(tmp_path / "full")

    # an interrupted run: stop after 3 steps (its checkpoint is the state a kill would leave)
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.infer import ConstantKL
    from pyro_llm.runs import ELBOS, build_for

    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"kind": "svi", "run": cfg.to_dict()}))
    pyro.clear_param_store()
    task = get_task(cfg.task)
    ex = load_examples(task, "train", limit=cfg.data.train_limit)
    model, tok = build_for(cfg, task, len(ex), None)
    trainer = SVITrainer(model, cfg.guide.build(model), cfg.optim, elbo=ELBOS[cfg.objective.elbo](),
                         use_flipout=cfg.guide.flipout, kl_schedule=ConstantKL(1.0), run_dir=run_dir, progress=False)
    trainer.fit(encode_examples(ex, tok, task.num_classes, cfg.data.max_length), stop_after=3)
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 3

    train(cfg, run_dir, resume=True, progress=False, evaluate_after=False)
    resumed = _params(run_dir)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    assert len(json.loads((run_dir / "history.json").read_text())) == 6


def test_existing_run_dir_is_refused(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "map", steps=2)
    train(cfg, tmp_path / "r", progress=False, evaluate_after=False)
    with pytest.raises(RunDirExistsError, match="--overwrite"):
        train(cfg, tmp_path / "r", progress=False)
    train(cfg, tmp_path / "r", overwrite=True, progress=False, evaluate_after=False)
    before = (tmp_path / "r" / "config.json").read_bytes()
    with pytest.raises(RunDirExistsError, match="finished"):  # nothing to continue; the run is left as it was
        train(cfg, tmp_path / "r", resume=True, progress=False)
    assert (tmp_path / "r" / "config.json").read_bytes() == before
    # killed before its folder existed: --resume starts it
    train(cfg, tmp_path / "none", resume=True, progress=False, evaluate_after=False)
    assert len(json.loads((tmp_path / "none" / "history.json").read_text())) == 2


def test_resume_may_change_the_learning_rate_and_records_it(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "map", steps=4)
    run = tmp_path / "r"
    train(cfg, run, progress=False, evaluate_after=False)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "state": "running"}))  # killed after its last checkpoint
    with pytest.raises(ValueError, match="optim.steps"):
        train(_cfg(tiny_llama, "map", steps=5), run, resume=True, progress=False)
    lower = SVIConfig.from_dict({**cfg.to_dict(), "optim": {**cfg.to_dict()["optim"], "lr": 1e-3}})
    train(lower, run, resume=True, progress=False, evaluate_after=False)
    config = json.loads((run / "config.json").read_text())
    assert config["state"] == "finished" and config["run"]["optim"]["lr"] == 1e-3
    assert config["resumes"] == [{"step": 4, "changed": {"lr": [1e-2, 1e-3]}}]


def test_interrupted_checkpoint_swap_recovers_old_copy(tiny_llama, tmp_path):
    from pyro_llm.infer import find_checkpoint

    cfg = _cfg(tiny_llama, "map", steps=3)
    train(cfg, tmp_path / "r", progress=False, evaluate_after=False)
    ckpt = tmp_path / "r" / "checkpoint"
    ckpt.rename(tmp_path / "r" / "checkpoint.old")  # a kill between the two renames
    assert find_checkpoint(tmp_path / "r") == tmp_path / "r" / "checkpoint.old"


def test_corrupt_guide_file_is_reported(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "blob", steps=2)
    train(cfg, tmp_path / "r", progress=False, evaluate_after=False)
    (tmp_path / "r" / "guide.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CorruptFileError, match="guide.safetensors"):
        load_run(tmp_path / "r")


def test_nan_loss_stops_with_a_clear_error(arc_model):
    model, data = arc_model
    from pyro_llm.guides import BLoBGuide

    guide = BLoBGuide(model)
    trainer = SVITrainer(model, guide, OptimConfig(steps=3, batch_size=4, lr=1e30, warmup_ratio=0.0),
                         progress=False)
    with pytest.raises(NonFiniteLossError, match="at step"):
        trainer.fit(data)


def test_train_then_evaluate_in_and_out_of_distribution(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, "blob", steps=4)
    metrics = train(cfg, tmp_path / "r", progress=False)
    assert set(metrics) == {"arc-easy/test"} and metrics["arc-easy/test"]["n"] == 16
    for name in ("config.json", "guide.safetensors", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "metrics.json", "reliability_arc-easy_test.png"):
        assert (tmp_path / "r" / name).is_file(), name
    trained = json.loads((tmp_path / "r" / "metrics.json").read_text())["arc-easy/test"]
    again = evaluate(tmp_path / "r", limit=16, progress=False, samples=3)
    twice = evaluate(tmp_path / "r", limit=16, progress=False, samples=3)
    other = evaluate(tmp_path / "r", limit=16, progress=False, samples=3, seed=7)
    assert again.n == 16 and again.as_dict() == twice.as_dict()  # reproducible: the run's seed by default
    assert other.nll != again.nll  # the seed reaches the weight samples
    ood = evaluate(tmp_path / "r", "winogrande", limit=12, progress=False)  # 2 answer classes
    assert ood.n == 12
    table = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert table["arc-easy/test"] == trained  # training's own metrics are never overwritten
    assert {"arc-easy/test/evaluate-n3-seed0", "arc-easy/test/evaluate-n3-seed7",
            "winogrande/test/evaluate-n3-seed0-limit12"} <= set(table)  # another limit: its own entry


def test_bfloat16_base_weights_train_on_cpu(tiny_llama):
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.guides import BLoBGuide
    from pyro_llm.models import build_model

    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=8)
    model, tok = build_model(str(tiny_llama), task, dtype="bfloat16", dataset_size=len(ex))
    assert next(model.peft_model.get_base_model().parameters()).dtype == torch.bfloat16
    data = encode_examples(ex, tok, task.num_classes, 64)
    guide = BLoBGuide(model)
    hist = SVITrainer(model, guide, OptimConfig(steps=3, batch_size=4, lr=1e-2), progress=False).fit(data)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert all(v.dtype == torch.float32 for v in pyro.get_param_store().values())




def test_a_resumed_trainer_uses_its_new_learning_rates_from_the_saved_step(arc_model, tmp_path):
    import pyro

    from pyro_llm.guides import BLoBGuide
    from pyro_llm.infer.schedules import warmup_decay

    model, data = arc_model
    first = OptimConfig(steps=6, batch_size=4, lr=1e-2, g_lr=1e-2, checkpoint_every=2)
    SVITrainer(model, BLoBGuide(model), first, run_dir=tmp_path, progress=False).fit(data, stop_after=4)
    lower = OptimConfig(steps=6, batch_size=4, lr=1e-3, g_lr=5e-3, checkpoint_every=2, warmup_ratio=0.5)
    trainer = SVITrainer(model, BLoBGuide(model), lower, run_dir=tmp_path, progress=False)
    trainer._setup(data.batch(data.training_batch(0, 4, 0)))
    from pyro_llm.infer.checkpoint import find_checkpoint, load_checkpoint

    step, _, _, state = load_checkpoint(find_checkpoint(tmp_path))
    trainer.load_optim_state(state)
    factor = warmup_decay(6, 0.5)(step)
    assert step == 4 and factor > 0
    for opt, base in zip(trainer.optimizers, (1e-3, 5e-3)):
        assert all(g["lr"] == pytest.approx(base * factor) for g in opt.param_groups)
    assert trainer.optimizers[0].state  # Adam's moments came back with the checkpoint
    pyro.clear_param_store()


def test_evaluations_with_other_limits_keep_their_own_entries(tiny_llama, tmp_path):
    run = tmp_path / "r"
    train(_cfg(tiny_llama, "map", steps=2), run, progress=False)
    a = evaluate(run, limit=4, progress=False)
    b = evaluate(run, limit=8, progress=False)
    table = json.loads((run / "metrics.json").read_text())
    assert table["arc-easy/test/evaluate-n0-seed0-limit4"]["n"] == a.n == 4
    assert table["arc-easy/test/evaluate-n0-seed0-limit8"]["n"] == b.n == 8
