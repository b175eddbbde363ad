"""torchrun with two CPU processes (gloo) gives the single-process result."""

import os
from pathlib import Path
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def _cmd(tiny_llama, out):
    return ["-m", "pyro_llm.cli.main", "svi-train", "--model", str(tiny_llama), "--guide", "map", "--no-flipout",
            "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--train-limit", "16", "--test-limit", "4",
            "--max-length", "64", "--device", "cpu", "--out", str(out)]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test runs on Linux")
def test_torchrun_two_processes_equals_one(tiny_llama, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, *_cmd(tiny_llama, tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29533", *_cmd(tiny_llama, tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "guide.safetensors"))
    b = load_file(str(tmp_path / "two" / "guide.safetensors"))
    assert a.keys() == b.keys()
    import torch

    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # every rank evaluated its share of the test set; rank 0 recorded the whole
    import json

    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma.keys() == mb.keys()
    for key in ma:
        assert mb[key]["nll"] == pytest.approx(ma[key]["nll"], rel=1e-4), key


def _torchrun(args, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test runs on Linux")
def test_kfac_glm_and_predictive_shared_by_two_ranks_equal_one_process(tiny_llama, tmp_path):
    """Each rank takes its share of the batches (3 batches: 2 on rank 0, 1 on rank 1) and the sums
    and gathers give every factor (dense and streamed), the log-likelihood, the GLM's logit moments
    and the sampled predictive of one process. Sharding without the sums, or the sums without
    sharding, would halve or double them."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = str(Path(__file__).parent / "ranks_worker.py")
    one = subprocess.run([sys.executable, worker, str(tiny_llama), str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun([worker, str(tiny_llama), str(tmp_path / "two.safetensors")], 29534), env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert int(a.pop("batches/local")) == 3 and int(b.pop("batches/local")) == 2  # rank 0's share
    assert a.keys() == b.keys() and any(k.startswith("streamed/") for k in a)
    for k in a:
        tol = dict(rtol=1e-5, atol=1e-6) if a[k].dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(b[k], a[k], **tol, msg=k)
    assert a["glm/cov"].abs().sum() > 0 and (a["nn/probs"].sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test runs on Linux")
def test_laplace_run_under_torchrun_equals_one_process(tiny_llama, tmp_path):
    """`pyro-llm laplace` under torchrun (2 CPU ranks): the same factors, evidence, prior precision
    (chosen on the validation NLL: the GLM pass shared too) and test metrics as one process, and
    rank 0 alone writes a run folder holding the same files."""
    import json

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    trained = subprocess.run([sys.executable, *_cmd(tiny_llama, tmp_path / "map")], env=env, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    args = ["-m", "pyro_llm.cli.main", "laplace", "--adapter", str(tmp_path / "map"), "--prior-precision", "val-nll",
            "--kfac-batch-size", "2", "--eval-batch-size", "2", "--device", "cpu"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun([*args, "--out", str(tmp_path / "two")], 29535), env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "one") == files(tmp_path / "two")
    a = load_file(str(tmp_path / "one" / "laplace" / "guide.safetensors"))
    b = load_file(str(tmp_path / "two" / "laplace" / "guide.safetensors"))
    assert a.keys() == b.keys()

    def factor(t, k):  # an eigenvector's sign is arbitrary: compare V diag(values) V^T
        base = k[:-len("eigvecs")]
        return t[k] @ torch.diag(t[base + "eigvals"]) @ t[k].T if k.endswith("eigvecs") else t[k]

    assert any(k.endswith("eigvecs") for k in a)
    for k in a:
        torch.testing.assert_close(factor(b, k), factor(a, k), rtol=1e-6, atol=1e-9, msg=k)
    fa, fb = (json.loads((tmp_path / d / "laplace" / "fit.json").read_text()) for d in ("one", "two"))
    for k in ("log_likelihood", "log_marginal_likelihood", "prior_precision", "num_examples"):
        assert fb[k] == pytest.approx(fa[k], rel=1e-6), k
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma.keys() == mb.keys()
    for key in ma:
        for k in ("accuracy", "nll", "ece", "brier"):
            assert mb[key][k] == pytest.approx(ma[key][k], rel=1e-5, abs=1e-7), (key, k)
