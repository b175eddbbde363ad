"""A run killed at any instant never blocks its rerun nor loses a finished run, and two writers
never share a folder.

Each exact-point case rebuilds on disk what ``kill -9`` leaves at one instant (the files a killed
write leaves are known: :mod:`pyro_llm.io` writes through ``.<name>.XXXX.tmp`` siblings,
checkpoints through ``.checkpoint.XXXX/``, ``--overwrite`` through ``.<name>.incoming`` and
``.<name>.replaced``), then runs the same command, plain and with ``--resume``: it must finish,
keep every finished run that was there, and leave no hidden folder or file behind. A real
``kill -9`` at exact code points (a process that exits inside ``os.replace`` or the adapter copy)
and the two-writer lock are tested with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyro_llm.runs import SVIConfig, RunDirExistsError, train
from pyro_llm.runs.lock import RunLockedError


def _cfg(model: Path, steps: int = 4) -> SVIConfig:
    return SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(model), "device": "cpu"},
                                "guide": {"name": "map"}, "data": {"train_limit": 16, "test_limit": 4,
                                                                   "max_length": 64},
                                "eval": {"samples": 0}, "optim": {"steps": steps, "batch_size": 4, "lr": 1e-2,
                                                                  "checkpoint_every": 2}})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(tiny_llama), run, progress=False)
    return run


def _hidden(root: Path) -> list[str]:
    """Everything hidden pyro-llm could have left under ``root`` (lock files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def _kill_leftovers(kind: str, run: Path, finished: Path) -> None:
    """What a kill at the instant ``kind`` leaves in and beside ``run``."""
    incoming, replaced = run.with_name(f".{run.name}.incoming"), run.with_name(f".{run.name}.replaced")
    if kind == "config-write":  # the first write of a new run: only its temporary file
        run.mkdir()
        (run / ".config.json.k2j4.tmp").write_text('{"kind": "sv')
    elif kind == "before-folder":  # nothing at all
        pass
    elif kind == "overwrite-staging":  # --overwrite killed while writing the new run beside the old
        shutil.copytree(finished, run)
        incoming.mkdir()
        (incoming / ".pyro-llm-staging").touch()
        (incoming / ".config.json.x81k.tmp").write_text("{")
    elif kind == "overwrite-staging-unmarked":  # killed between creating the staging folder and marking it
        shutil.copytree(finished, run)
        incoming.mkdir()
    elif kind == "swap-between-renames-complete":  # old run moved aside, the complete new one not yet in
        shutil.copytree(finished, replaced)
        shutil.copytree(finished, incoming)
    elif kind == "swap-between-renames-incomplete":
        shutil.copytree(finished, replaced)
        incoming.mkdir()
        (incoming / ".pyro-llm-staging").touch()
    elif kind == "swap-after-renames":  # the new run in place, the old one not yet removed
        shutil.copytree(finished, run)
        shutil.copytree(finished, replaced)
    elif kind == "checkpoint-staging":  # a run killed while writing a checkpoint, after an earlier one
        shutil.copytree(finished, run)
        cfg = _config(run)
        (run / "config.json").write_text(json.dumps({**cfg, "state": "running"}))
        for name in ("metrics.json", "history.json"):
            (run / name).unlink()
        dead = run / ".checkpoint.a8d2k1"
        dead.mkdir()
        (dead / "params.safetensors").write_bytes(b"\0" * 10)
    elif kind == "lock-of-a-dead-process":  # the lock file of a killed command (no flock held)
        run.parent.mkdir(parents=True, exist_ok=True)
        run.with_name(f".{run.name}.lock").write_text('{"pid": 999999, "host": "gone"}\n')
    else:
        raise AssertionError(kind)


KILLS = ["config-write", "before-folder", "overwrite-staging", "overwrite-staging-unmarked",
         "swap-between-renames-complete", "swap-between-renames-incomplete", "swap-after-renames",
         "checkpoint-staging", "lock-of-a-dead-process"]


@pytest.mark.parametrize("resume", [False, True], ids=["rerun", "resume"])
@pytest.mark.parametrize("kind", KILLS)
def test_a_kill_at_any_instant_never_blocks_the_rerun(tmp_path, tiny_llama, finished, kind, resume):
    run = tmp_path / "run"
    _kill_leftovers(kind, run, finished)
    had_run = (run / "config.json").is_file() or run.with_name(f".{run.name}.replaced").is_dir()
    finished_before = had_run and kind != "checkpoint-staging"
    overwrite = finished_before and not resume
    if finished_before and resume:  # a finished run has nothing to continue: refused, left as it was
        with pytest.raises(RunDirExistsError, match="finished"):
            train(_cfg(tiny_llama), run, resume=True, progress=False)
        assert _config(run)["state"] == "finished" and (run / "metrics.json").is_file()
    elif kind == "checkpoint-staging" and not resume:  # a started run: the message says how to go on
        with pytest.raises(RunDirExistsError, match="--resume to continue"):
            train(_cfg(tiny_llama), run, progress=False)
        assert (run / "checkpoint" / "state.json").is_file()
    else:
        train(_cfg(tiny_llama), run, overwrite=overwrite, resume=resume, progress=False)
        assert _config(run)["state"] == "finished" and (run / "metrics.json").is_file()
        assert len(json.loads((run / "history.json").read_text())) == 4
    assert _hidden(tmp_path) == []  # no staging, swap, checkpoint staging, temporary or lock file left


def test_failed_resume_leaves_a_finished_run_as_it_was(tmp_path, tiny_llama, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoint" / "optim.pt").write_bytes(b"truncated")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunDirExistsError):
        train(_cfg(tiny_llama), run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(RunDirExistsError, match="--overwrite"):  # and a plain rerun still refuses to replace it
        train(_cfg(tiny_llama), run, progress=False)


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pyro_llm.runs.lock import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_count(tmp_path, tiny_llama):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for kw in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
                train(_cfg(tiny_llama), run, progress=False, **kw)
        assert not run.exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(_cfg(tiny_llama), run, progress=False)  # the dead holder's lock file is taken over
    assert _config(run)["state"] == "finished" and _hidden(tmp_path) == []


#: a CLI process that dies with kill -9's abruptness (no cleanup) at the N-th call of ``point``
DIE_AT = textwrap.dedent("""
    import os, shutil, sys
    point, nth, onto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = {"n": 0}
    def dying(real):
        def call(*a, **k):
            if onto == "-" or os.path.abspath(str(a[1])) == onto:
                calls["n"] += 1
            if calls["n"] == nth:
                if point == "copytree":  # half the copy done
                    os.makedirs(a[1], exist_ok=True)
                    open(os.path.join(a[1], "adapter_config.json"), "w").write("{")
                os._exit(9)
            return real(*a, **k)
        return call
    if point == "replace":
        os.replace = dying(os.replace)
    else:
        shutil.copytree = dying(shutil.copytree)
    sys.argv = ["pyro-llm", *sys.argv[4:]]
    from pyro_llm.cli.main import cli
    cli()
""")


def _cli(args: list[str], die: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", DIE_AT, *map(str, die), *args] if die else \
        [sys.executable, "-m", "pyro_llm.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_real_kills_at_exact_points_then_the_same_command(tmp_path, tiny_llama, finished):
    svi = ["svi-train", "--model", str(tiny_llama), "--guide", "map", "--train-limit", "16", "--test-limit", "4",
           "--max-length", "64", "--device", "cpu", "--steps", "4", "--checkpoint-every", "2", "--eval-samples", "0"]
    laplace = ["laplace", "--adapter", str(finished), "--train-limit", "8", "--test-limit", "4", "--max-length", "64",
               "--device", "cpu", "--prior-precision", "1.0"]
    cases = [  # (command, overwrite on rerun, the exact point)
        (svi, False, ("replace", 1, "-")),   # the first atomic write: config.json
        (svi, False, ("replace", 3, "-")),   # inside the first checkpoint's swap
        (svi, True, ("replace", 1, "OUT")),  # --overwrite: between the two renames of the swap
        (laplace, False, ("copytree", 1, "-")),  # laplace during its adapter copy
        (laplace, False, ("replace", 1, "-")),  # laplace's first write
    ]
    for k, (command, overwrite, die) in enumerate(cases):
        out = tmp_path / f"out{k}"
        die = tuple(str(out.resolve()) if d == "OUT" else d for d in die)
        if overwrite:
            shutil.copytree(finished, out)
        args = [*command, "--out", str(out), *(["--overwrite"] if overwrite else [])]
        killed = _cli(args, die)
        assert killed.returncode == 9, killed.stderr[-1500:]
        again = _cli(args)
        assert again.returncode == 0, again.stderr[-1500:]
        assert _config(out)["state"] == "finished"
    assert _hidden(tmp_path) == []


def test_ensemble_output_may_not_overwrite_its_inputs(tmp_path, tiny_llama, finished):
    from pyro_llm.runs import evaluate_ensemble

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    shutil.copytree(finished, b)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    for out, pattern in ((a / "config.json", "inside the input"), (tiny_llama / "config.json", "inside the input"),
                         (mine, "not an ensemble result"), (tmp_path, "is a folder")):
        before = out.read_bytes() if out.is_file() else None
        with pytest.raises(ValueError, match=pattern):
            evaluate_ensemble([a, b], out=out, progress=False)
        assert before is None or out.read_bytes() == before
    evaluate_ensemble([a, b], out=tmp_path / "ens.json", progress=False)
    evaluate_ensemble([a, b], out=tmp_path / "ens.json", progress=False)  # its own result it may replace
    assert "ensemble" in json.loads((tmp_path / "ens.json").read_text())
