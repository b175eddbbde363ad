"""Bad inputs, as a new user types them: each is refused with a non-zero exit, one line that names
the problem (never a traceback), and every file that existed before is byte for byte unchanged
(and, where the refusal comes before any work, nothing new is written)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyro_llm.cli import cli

SVI = ["svi-train", "--model", "{model}", "--train-limit", "16", "--test-limit", "8", "--max-length", "64",
       "--device", "cpu", "--steps", "2", "--guide", "map"]
LAPLACE = ["laplace", "--adapter", "{run}", "--train-limit", "8", "--test-limit", "8", "--max-length", "64",
           "--device", "cpu"]
ZERO = ["zero-shot", "--model", "{model}", "--test-limit", "4", "--max-length", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    """A finished MAP run with its checkpoint (the input the laplace and evaluate cases spoil)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = CliRunner().invoke(cli, [a.format(model=tiny_llama) for a in SVI] + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory) -> Path:
    """A peft adapter made for a Llama of another width (its shapes cannot fit the tiny Llama)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("other-base")
    base = save_tiny_llama(root / "base", hidden=48)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "adapter")
    return root / "adapter"


@pytest.fixture()
def world(tmp_path, tiny_llama, trained, other_base_adapter) -> dict[str, Path]:
    """Everything a case may point at, all under ``tmp_path`` except the shared tiny model."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article} years of work\n")
    (tmp_path / "a-file.txt").write_text("not a folder\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\xe9?", "choices": ["a", "b"], "answer": 0}\n'
                                            .encode("latin-1"))
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    bad_config = tmp_path / "bad-config-run"
    shutil.copytree(trained, bad_config)
    (bad_config / "config.json").write_text('{"kind": "svi", "run": {')
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    (no_adapter / "README").write_text("nothing here\n")
    line = {"question": "q?", "choices": ["a", "b"], "split": "train"}
    for name, answer in (("answer_frac", 1.7), ("answer_bool", True)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({**line, "answer": answer}) for _ in range(8)))
    adapters = {}
    for name in ("trunc-adapter", "json-adapter", "rank-adapter"):
        adapters[name.replace("-", "_")] = tmp_path / name
        shutil.copytree(trained / "adapter", tmp_path / name)
    weights = tmp_path / "trunc-adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    (tmp_path / "json-adapter" / "adapter_config.json").write_text("{ not json")
    config = json.loads((tmp_path / "rank-adapter" / "adapter_config.json").read_text())
    (tmp_path / "rank-adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    return {"model": tiny_llama, "run": run, "thesis": thesis, "file": tmp_path / "a-file.txt",
            "answer_frac": tmp_path / "answer_frac.jsonl", "answer_bool": tmp_path / "answer_bool.jsonl", **adapters,
            "latin1": tmp_path / "latin1.jsonl", "broken": broken, "bad_config": bad_config,
            "no_adapter": no_adapter, "other_adapter": other_base_adapter, "out": tmp_path / "out",
            "root": tmp_path}


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


#: (id, arguments, a pattern the message must contain)
CASES = [
    ("steps-0", SVI + ["--steps", "0", "--out", "{out}"], "steps must be >= 1"),
    ("batch-size-0", SVI + ["--batch-size", "0", "--out", "{out}"], "batch_size must be >= 1"),
    ("lr-nan", SVI + ["--lr", "nan", "--out", "{out}"], "lr must be a finite number"),
    ("lr-negative", SVI + ["--lr", "-1", "--out", "{out}"], "lr must be >= 0"),
    ("g-lr-nan", SVI + ["--g-lr", "nan", "--out", "{out}"], "g_lr must be a finite number"),
    ("warmup-negative", SVI + ["--warmup-ratio", "-1", "--out", "{out}"], "warmup_ratio must be >= 0"),
    ("warmup-above-1", SVI + ["--warmup-ratio", "2", "--out", "{out}"], "warmup_ratio must be <= 1"),
    ("checkpoint-every-0", SVI + ["--checkpoint-every", "0", "--out", "{out}"], "checkpoint_every must be >= 1"),
    ("max-length-0", SVI + ["--max-length", "0", "--out", "{out}"], "max_length must be >= 8"),
    ("eval-batch-size-0", SVI + ["--eval-batch-size", "0", "--out", "{out}"], "eval_batch_size must be >= 1"),
    ("ece-bins-0", SVI + ["--ece-bins", "0", "--out", "{out}"], "ece_bins must be >= 1"),
    ("eval-samples-negative", SVI + ["--eval-samples", "-1", "--out", "{out}"], "eval_samples must be >= 0"),
    ("prior-scale-inf", SVI + ["--prior-scale", "inf", "--out", "{out}"], "prior_scale must be a finite number"),
    ("prior-scale-0", SVI + ["--prior-scale", "0", "--out", "{out}"], "prior_scale must be > 0"),
    ("rank-0", SVI + ["--rank", "0", "--out", "{out}"], "rank must be >= 1"),
    ("alpha-0", SVI + ["--alpha", "0", "--out", "{out}"], "alpha must be > 0"),
    ("kl-weight-negative", SVI + ["--kl-weight", "-1", "--out", "{out}"], "kl_weight must be >= 0"),
    ("kl-anneal-negative", SVI + ["--kl-anneal-steps", "-1", "--out", "{out}"], "kl_anneal_steps must be >= 0"),
    ("max-rows-0", SVI + ["--max-rows", "0", "--out", "{out}"], "max_rows must be >= 1"),
    ("train-limit-0", SVI + ["--train-limit", "0", "--out", "{out}"], "train_limit must be >= 1"),
    ("test-limit-negative", SVI + ["--test-limit", "-5", "--out", "{out}"], "test_limit must be >= 1"),
    ("lora-dropout-1.5", SVI + ["--lora-dropout", "1.5", "--out", "{out}"], "lora_dropout must be <= 0.99"),
    ("seed-negative", SVI + ["--seed", "-1", "--out", "{out}"], "seed must be >= 0"),
    ("split-fractions-sum", SVI + ["--split-fractions", "0.5,0.5,0.5", "--out", "{out}"], "split_fractions must be"),
    ("split-fractions-words", SVI + ["--split-fractions", "most,some,rest", "--out", "{out}"], "comma-separated"),
    ("test-only-task", SVI + ["--task", "imdb", "--model", "{model}", "--out", "{out}"], "0 training examples"),
    ("targets-empty", SVI + ["--targets", ",", "--out", "{out}"], "targets must be non-empty module names"),
    ("unknown-task", SVI + ["--task", "arc-eazy", "--out", "{out}"], "unknown task 'arc-eazy'"),
    ("missing-task-file", SVI + ["--task", "{root}/nope.jsonl", "--out", "{out}"], "nope.jsonl"),
    ("non-utf8-task-file", SVI + ["--task", "{latin1}", "--out", "{out}"], "latin1.jsonl: not UTF-8"),
    ("missing-model", SVI + ["--model", "{root}/no-model", "--out", "{out}"], "cannot load model"),
    ("truncated-weights", SVI + ["--model", "{broken}", "--out", "{out}"], "broken-model.*corrupt"),
    ("bad-device", SVI + ["--device", "tpu9", "--out", "{out}"], "tpu9"),
    ("foreign-folder-overwrite", SVI + ["--out", "{thesis}", "--overwrite"], "not a pyro-llm run"),
    ("foreign-folder", SVI + ["--out", "{thesis}"], "not a pyro-llm run"),
    ("out-is-a-file", SVI + ["--out", "{file}"], "is a file"),
    ("out-is-the-model", SVI + ["--out", "{model}", "--overwrite"], "overlaps the input"),
    ("overwrite-and-resume", SVI + ["--out", "{run}", "--overwrite", "--resume"], "exclude each other"),
    ("existing-run", SVI + ["--out", "{run}"], "--overwrite"),
    ("resume-finished-run", SVI + ["--out", "{run}", "--resume", "--lr", "0.5"], "holds a finished run"),
    ("seed-beyond-64-bits", SVI + ["--seed", str(2 ** 64), "--out", "{out}"], "seed must be <="),
    ("split-fractions-nan", SVI + ["--split-fractions", "nan,0.5,0.5", "--out", "{out}"], "split_fractions must be"),
    ("answer-fraction", SVI + ["--task", "{answer_frac}", "--out", "{out}"], "answer.*1.7"),
    ("answer-boolean", SVI + ["--task", "{answer_bool}", "--out", "{out}"], "answer.*True"),
    ("laplace-truncated-adapter-weights", ["laplace", "--adapter", "{trunc_adapter}", "--model", "{model}",
                                           "--out", "{out}"], "trunc-adapter"),
    ("laplace-adapter-config-not-json", ["laplace", "--adapter", "{json_adapter}", "--model", "{model}",
                                         "--out", "{out}"], "json-adapter/adapter_config.json"),
    ("laplace-adapter-rank-a-word", ["laplace", "--adapter", "{rank_adapter}", "--model", "{model}",
                                     "--out", "{out}"], "rank-adapter/adapter_config.json.*r must be"),
    ("evaluate-seed-beyond-64-bits", ["evaluate", "{run}", "--seed", str(2 ** 64)], "seed must be <="),
    ("evaluate-ensemble-out-in-run", ["evaluate", "{run}", "{run}", "--out", "{run}/config.json"], "inside the input"),
    ("overwrite-with-missing-model", SVI + ["--model", "{root}/no-model", "--out", "{run}", "--overwrite"],
     "cannot load model"),
    ("laplace-out-is-adapter", LAPLACE + ["--out", "{run}", "--overwrite"], "overlaps the input"),
    ("laplace-out-inside-adapter", LAPLACE + ["--out", "{run}/laplace-here"], "overlaps the input"),
    ("laplace-prior-precision-inf", LAPLACE + ["--prior-precision", "inf", "--out", "{out}"],
     "prior-precision must be"),
    ("laplace-prior-precision-word", LAPLACE + ["--prior-precision", "big", "--out", "{out}"],
     "prior-precision must be"),
    ("laplace-batch-size-0", LAPLACE + ["--kfac-batch-size", "0", "--out", "{out}"], "batch_size must be >= 1"),
    ("laplace-mc-samples-0", LAPLACE + ["--mc-samples", "0", "--out", "{out}"], "mc_samples must be >= 1"),
    ("laplace-glm-max-tokens-0", LAPLACE + ["--glm-max-tokens", "0", "--out", "{out}"], "glm_max_tokens must be >= 1"),
    ("laplace-n-kfac-0", LAPLACE + ["--n-kfac", "0", "--out", "{out}"], "n_kfac must be >= 1"),
    ("laplace-not-an-adapter", ["laplace", "--adapter", "{no_adapter}", "--model", "{model}", "--out", "{out}"],
     "no adapter_config.json"),
    ("laplace-other-base", ["laplace", "--adapter", "{other_adapter}", "--model", "{model}", "--train-limit", "8",
                            "--max-length", "64", "--out", "{out}"], "made for another base model"),
    ("laplace-corrupt-run-config", LAPLACE[:2] + ["{bad_config}"] + LAPLACE[3:] + ["--out", "{out}"],
     "bad-config-run/config.json is not valid JSON"),
    ("evaluate-samples-negative", ["evaluate", "{run}", "--samples", "-1"], "samples must be >= 0"),
    ("evaluate-seed-negative", ["evaluate", "{run}", "--seed", "-1"], "seed must be >= 0"),
    ("evaluate-limit-0", ["evaluate", "{run}", "--limit", "0"], "limit must be >= 1"),
    ("evaluate-glm-on-a-point-guide", ["evaluate", "{run}", "--predictive", "glm"], "needs a Gaussian guide"),
    ("evaluate-map-predictive-on-svi", ["evaluate", "{run}", "--predictive", "map"],
     "an SVI run's predictive is one of nn, glm, glm-mc"),
    ("evaluate-prior-precision-without-glm", ["evaluate", "{run}", "--prior-precision", "1"],
     "--prior-precision reads an SVI run's guide under another prior"),
    ("evaluate-prior-precision-0", ["evaluate", "{run}", "--predictive", "glm", "--prior-precision", "0"],
     "must be 'validation' or a positive number"),
    ("evaluate-glm-with-samples", ["evaluate", "{run}", "--predictive", "glm", "--samples", "3"],
     "--samples applies to the N-sample predictive"),
    ("evaluate-not-a-run", ["evaluate", "{thesis}"], "not a pyro-llm run"),
    ("evaluate-corrupt-config", ["evaluate", "{bad_config}"], "bad-config-run/config.json is not valid JSON"),
    ("evaluate-unknown-task", ["evaluate", "{run}", "--task", "nope"], "unknown task 'nope'"),
    ("zero-shot-max-length-0", ZERO + ["--max-length", "0", "--out", "{out}"], "max_length must be >= 8"),
    ("zero-shot-test-limit-0", ZERO + ["--test-limit", "0", "--out", "{out}"], "test_limit must be >= 1"),
    ("zero-shot-foreign-overwrite", ZERO + ["--out", "{thesis}", "--overwrite"], "not a pyro-llm run"),
    ("tasks-extra-argument", ["tasks", "--bogus"], "No such option '--bogus'"),
]


@pytest.mark.parametrize("args,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_touches_nothing(world, args, pattern):
    import re

    before = _snapshot(world["root"], world["model"])
    res = CliRunner().invoke(cli, [a.format(**world) for a in args])
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert re.search(pattern, res.output), res.output
    assert _snapshot(world["root"], world["model"]) == before  # nothing changed, nothing new
    assert not world["out"].exists()


def test_checkpoint_with_an_impossible_step_or_a_pickle_is_refused(world):
    run, ckpt = world["run"], world["run"] / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "state": "running"}))  # killed after its last checkpoint
    (ckpt / "state.json").write_text(json.dumps({**state, "step": -3}))
    args = [a.format(**world) for a in SVI] + ["--out", str(run), "--resume"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "state.json" in res.output and "step >= 0" in res.output, res.output
    (ckpt / "state.json").write_text(json.dumps({**state, "step": 1000000}))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "state.json" in res.output and "step 1000000" in res.output, res.output
    (ckpt / "state.json").write_text(json.dumps(state))

    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (ckpt / "optim.pt").write_bytes(pickle.dumps(Evil()))
    before = _snapshot(run)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "optim.pt" in res.output and "could run code" in res.output, res.output
    assert "pwned" not in res.output and "weights_only=False" not in res.output
    assert _snapshot(run) == before


def test_non_finite_training_stops_before_a_bad_checkpoint(world):
    out = world["root"] / "nan-run"
    args = [a.format(**world) for a in SVI[:-2]] + ["--guide", "blob", "--lr", "1e6", "--g-lr", "1e6", "--steps", "40",
                                                   "--checkpoint-every", "2", "--warmup-ratio", "0", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "not finite" in res.output and "step" in res.output, res.output
    from safetensors.torch import load_file

    ckpt = out / "checkpoint" / "params.safetensors"
    if ckpt.is_file():  # whatever checkpoint was written holds finite values only
        assert all(bool(v.isfinite().all()) for v in load_file(str(ckpt)).values())
        assert "last good checkpoint" in res.output
    # the failed run does not block the corrected rerun (nor its --resume)
    fixed = args[: args.index("--lr")] + ["--steps", "2", "--out", str(out)]
    res = CliRunner().invoke(cli, fixed + (["--resume"] if ckpt.is_file() else []))
    assert res.exit_code == 0, res.output


def _api(name):
    import pyro_llm.infer
    import pyro_llm.runs

    return getattr(pyro_llm.runs, name, None) or getattr(pyro_llm.infer, name)


@pytest.mark.parametrize("make,pattern", [
    (lambda: __import__("pyro_llm.infer", fromlist=["OptimConfig"]).OptimConfig(lr=math.nan), "lr"),
    (lambda: __import__("pyro_llm.infer", fromlist=["OptimConfig"]).OptimConfig(checkpoint_every=0), "checkpoint_every"),
    (lambda: __import__("pyro_llm.infer", fromlist=["OptimConfig"]).OptimConfig(warmup_ratio=-1), "warmup_ratio"),
    (lambda: __import__("pyro_llm.priors", fromlist=["GaussianPrior"]).GaussianPrior(math.inf), "prior std"),
    (lambda: __import__("pyro_llm.runs", fromlist=["SVIConfig"]).SVIConfig.from_dict({"lora": {"rank": 0}}), "rank"),
    (lambda: __import__("pyro_llm.runs", fromlist=["SVIConfig"]).SVIConfig.from_dict({"guide": {"name": "nope"}}),
     "unknown guide 'nope'"),
    (lambda: __import__("pyro_llm.runs", fromlist=["SVIConfig"]).SVIConfig.from_dict({"eval": {"sample": 3}}),
     "unknown keys"),
    (lambda: __import__("pyro_llm.runs", fromlist=["LaplaceConfig"]).LaplaceConfig(prior_precision="inf"),
     "prior-precision"),
    (lambda: __import__("pyro_llm.curvature", fromlist=["KFACConfig"]).KFACConfig(batch_size=0), "batch_size"),
    (lambda: __import__("pyro_llm.runs", fromlist=["EvalConfig"]).EvalConfig(samples=-1), "eval_samples"),
    (lambda: _api("OptimConfig")(metadata=5), "metadata"),
    (lambda: _api("OptimConfig")(seed=2 ** 64), "seed"),
    (lambda: _api("ModelConfig")(device="tpu"), "device"),
    (lambda: _api("ModelConfig")(name=5), "model"),
    (lambda: _api("LaplaceConfig")(mc_samples=math.nan), "mc_samples"),
    (lambda: _api("LaplaceConfig")(mc_samples=2.5), "mc_samples"),
    (lambda: _api("LaplaceConfig")(mc_samples="x"), "mc_samples"),
    (lambda: _api("LaplaceConfig")(a_only="yes"), "a_only"),
    (lambda: _api("SVIConfig")(task="nosuch"), "unknown task"),
    (lambda: _api("SVIConfig").from_dict([]), "mapping"),
    (lambda: _api("SVIConfig").from_dict({"lora": {"target_modules": 5}}), "targets"),
    (lambda: _api("DataConfig")(split_fractions=(math.nan, 0.5, 0.5)), "split_fractions"),
], ids=["optim-lr-nan", "optim-checkpoint-0", "optim-warmup", "gaussian-inf", "rank-0", "unknown-guide",
        "unknown-key", "laplace-inf", "kfac-batch-0", "eval-samples", "optim-metadata", "optim-seed-huge",
        "model-device", "model-name", "laplace-mc-nan", "laplace-mc-fraction", "laplace-mc-word", "laplace-a-only",
        "run-task", "run-from-list", "targets-int", "data-fractions-nan"])
def test_python_api_refuses_what_the_cli_refuses(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()
