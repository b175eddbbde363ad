"""The results study runs end to end (tiny configuration) through the public API."""

import json
import subprocess
import sys
from pathlib import Path


def test_study_tiny_configuration(tiny_llama, tmp_path):
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "bench.study", "--config", "tiny", "--model", str(tiny_llama),
                          "--out", str(tmp_path), "--seeds", "0", "1", "--tasks", "openbookqa", "--skip-bench"],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    ood = ["arc-challenge", "arc-easy", "mmlu-college-chemistry", "mmlu-college-physics"]
    # OOD rows are named by the training task, so ARC-Easy as an OOD test never merges with ARC-Easy runs
    assert set(results) == {"openbookqa/test"} | {f"openbookqa → {t}/test" for t in ood}
    assert all(len(results[row]["map"]["ece"]) == 2 for row in results)
    own = results["openbookqa/test"]
    assert set(own) == {"map", "temperature", "mc-dropout", "ensemble", "blob", "laplace"}
    assert len(own["blob"]["ece"]) == 2 and len(own["ensemble"]["ece"]) == 1
    assert own["temperature"]["accuracy"] == own["map"]["accuracy"]  # temperature keeps the argmax
    assert (tmp_path / "reliability_openbookqa.png").is_file()
    assert "| blob |" in (tmp_path / "results.md").read_text()
