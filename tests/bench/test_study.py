"""The results study runs end to end (tiny configuration) through the public API, every baseline a
library feature, and resumes without redoing anything."""

import json
import subprocess
import sys
from pathlib import Path


def test_study_tiny_configuration(tiny_llama, tmp_path):
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "bench.study", "--config", "tiny", "--model", str(tiny_llama), "--out", str(tmp_path),
           "--seeds", "0", "1", "--skip-bench", "--resamples", "50"]
    # the seeds side by side (one process each), then the tables over their finished runs
    res = subprocess.run(cmd + ["--jobs", "2"], capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all((tmp_path / "runs" / f"seed{s}-tables" / "results.json").is_file() for s in (0, 1))
    saved = json.loads((tmp_path / "results.json").read_text())
    results, diffs = saved["results"], saved["paired_differences"]
    # OOD rows are named by the training task, so ARC-Easy as an OOD test never merges with ARC-Easy runs
    assert set(results) == {"openbookqa/test", "openbookqa → arc-easy/test"}
    own = results["openbookqa/test"]
    assert set(own) == {"map", "map+ts", "mc-dropout", "ensemble", "blob", "blob-mean", "blob+ts", "laplace-marglik",
                        "laplace-valnll", "laplace+ts"}
    assert all(len(own[m]["ece"]) == 2 for m in own if m != "ensemble") and len(own["ensemble"]["ece"]) == 1
    assert own["map+ts"]["accuracy"] == own["map"]["accuracy"]  # a temperature keeps the argmax
    assert own["blob"]["nll"] != own["blob-mean"]["nll"]  # N samples against the mean weights
    d = diffs["openbookqa/test"]["blob"]["map"]["nll"]
    assert d["low"] <= d["difference"] <= d["high"] and d["resamples"] == 50
    assert set(diffs["openbookqa/test"]["map"]) == {"map+ts"}  # MAP against its tempered self
    assert (tmp_path / "reliability_openbookqa.png").is_file()
    assert "| blob |" in (tmp_path / "results.md").read_text()
    # resume: a second run (one process) finds every run and evaluation done and redoes none of them
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.json")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.json")} == stamps


def test_a_failed_seed_does_not_stop_the_others(tiny_llama, tmp_path):
    root = Path(__file__).resolve().parents[2]
    # seed -1 fails at once (an invalid seed); seed 0 must still run to its end before the command fails
    cmd = [sys.executable, "-m", "bench.study", "--config", "tiny", "--model", str(tiny_llama), "--out", str(tmp_path),
           "--seeds", "-1", "0", "--skip-bench", "--resamples", "20", "--no-ood", "--jobs", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode != 0
    assert "seed -1 (exit 1" in res.stderr and "seed 0 " not in res.stderr
    assert (tmp_path / "runs" / "seed0-tables" / "results.json").is_file()
    assert (tmp_path / "runs" / "openbookqa" / "seed0" / "laplace-valnll" / "metrics.json").is_file()
    assert not (tmp_path / "results.json").exists()  # no pooled table over a missing seed
    # --finished-only reports the finished cells, marked as one seed of two, and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.json")}
    res = subprocess.run(cmd[:-2] + ["--finished-only"], capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.json")} == stamps
    assert not (tmp_path / "runs" / "openbookqa" / "seed-1").exists()
    own = json.loads((tmp_path / "results.json").read_text())["results"]["openbookqa/test"]
    assert "ensemble" not in own and {m: r["seeds"] for m, r in own.items()} == {m: 1 for m in own}
    assert "laplace+ts" in own and "| map (1 of 2 seeds) |" in (tmp_path / "results.md").read_text()
