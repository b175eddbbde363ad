"""A full disk (a file-size limit, as ``ulimit -f`` sets) while a run writes: the error names the
file, nothing half-written is left in its place, an evaluation is not half recorded; files follow
the user's umask, and identical runs write identical bytes."""

from __future__ import annotations

import os
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pyro_llm.evaluation import compute_metrics
from pyro_llm.io import FileWriteError, atomic_save_tensors, atomic_torch_save, atomic_write_json
from pyro_llm.runs import LaplaceRunConfig, SVIConfig, laplace, record_metrics, train


@contextmanager
def file_size_limit(nbytes: int):
    """Writes beyond ``nbytes`` fail with EFBIG (SIGXFSZ ignored), as on a disk that is full."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_json(p, {"x": "y" * 100_000}),
    lambda p: atomic_save_tensors(p, {"t": torch.zeros(100_000)}),
    lambda p: atomic_torch_save(p, {"t": torch.zeros(100_000)}),
], ids=["json", "safetensors", "torch"])
def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path, write):
    path = tmp_path / "file.bin"
    path.write_bytes(b"the earlier version")
    with file_size_limit(4096), pytest.raises(FileWriteError, match=str(path)):
        write(path)
    assert path.read_bytes() == b"the earlier version"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary file left


def _cfg(model: Path) -> SVIConfig:
    return SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(model), "device": "cpu"},
                                "guide": {"name": "map"}, "data": {"train_limit": 16, "test_limit": 4,
                                                                   "max_length": 64},
                                "eval": {"samples": 0}, "optim": {"steps": 2, "batch_size": 4, "lr": 1e-2}})


def test_an_evaluation_is_recorded_whole_or_not_at_all(tmp_path, tiny_llama):
    run = tmp_path / "run"
    train(_cfg(tiny_llama), run, progress=False)
    before = (run / "metrics.json").read_bytes()
    probs, labels = torch.full((400, 4), 0.25), torch.zeros(400, dtype=torch.long)
    files = sorted(p.name for p in run.rglob("*"))
    with file_size_limit(2048), pytest.raises(FileWriteError, match="could not write"):
        record_metrics(run, "arc-easy/test/evaluate-big", compute_metrics(probs, labels), probs, labels)
    assert (run / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in run.rglob("*")) == files  # no partial diagram, prediction or temporary file


def test_files_follow_the_umask_and_identical_runs_write_identical_bytes(tmp_path, tiny_llama):
    old = os.umask(0o022)
    try:
        for name in ("a", "b"):
            train(_cfg(tiny_llama), tmp_path / name, progress=False)
            laplace(LaplaceRunConfig.like(_cfg(tiny_llama), laplace={"adapter": str(tmp_path / name),
                                                                     "prior_precision": "1.0"}),
                    tmp_path / f"laplace-{name}", progress=False)
    finally:
        os.umask(old)
    for rel in ("config.json", "metrics.json", "guide.safetensors", "checkpoint/params.safetensors"):
        assert (tmp_path / "a" / rel).stat().st_mode & 0o777 == 0o644, rel
    assert (tmp_path / "laplace-a" / "laplace" / "guide.safetensors").read_bytes() == \
        (tmp_path / "laplace-b" / "laplace" / "guide.safetensors").read_bytes()
    assert (tmp_path / "a" / "guide.safetensors").read_bytes() == (tmp_path / "b" / "guide.safetensors").read_bytes()
