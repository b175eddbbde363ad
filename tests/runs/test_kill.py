"""``kill -9`` at random points of a real ``pyro-llm svi-train`` process (before its first
checkpoint too), then the same command with ``--resume`` until it finishes: the result is bit for
bit the uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def _command(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pyro_llm.cli.main", "svi-train", "--model", str(model), "--guide", "blob",
            "--train-limit", "16", "--test-limit", "4", "--max-length", "64", "--device", "cpu", "--steps", "8",
            "--checkpoint-every", "2", "--eval-samples", "2", "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _kill_when(cmd: list[str], ready, delay: float) -> None:
    """Start ``cmd``; once ``ready()`` holds, wait ``delay`` seconds and ``kill -9`` it."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_random_kills_then_resume_equal_the_uninterrupted_run(tiny_llama, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_command(tiny_llama, full), env=_env(), check=True, capture_output=True)
    rng = random.Random(0)
    out = tmp_path / "killed"
    cmd = _command(tiny_llama, out)
    state = out / "checkpoint" / "state.json"
    # before anything is written, after config.json but before the first checkpoint, then anywhere
    _kill_when(cmd, lambda: True, rng.uniform(0.0, 1.0))
    _kill_when(cmd + ["--resume"] if out.is_dir() else cmd, lambda: (out / "config.json").is_file(), 0.0)
    assert not state.exists()  # this kill came before the first checkpoint
    def finished() -> bool:  # a kill that came too late: the run completed before it
        return json.loads((out / "config.json").read_text()).get("state") == "finished"

    for _ in range(4):
        if not finished():
            _kill_when(cmd + ["--resume"], lambda: state.is_file(), rng.uniform(0.0, 0.5))
    if not finished():  # --resume of a finished run is refused: it has nothing to continue
        done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert finished()
    a, b = load_file(str(full / "guide.safetensors")), load_file(str(out / "guide.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].equal(b[k]), k
