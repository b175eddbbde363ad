"""torchrun with two CPU processes (gloo) gives the single-process result."""

import os
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
