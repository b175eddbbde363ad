"""BLoB on the ``cpu-sst2`` study cell with ``G``'s learning rate as the one change, scored on the
validation split (to choose by) and on the test split against the study's MAPs.

Each ``(g_lr, seed)`` is a plain :func:`pyro_llm.runs.train` call of the study's configuration;
seeds run side by side (one process, one thread each). The report pools the seeds' test
predictions and gives BLoB's paired differences to the MAP runs of a finished study
(``--study-runs``) with 95 % bootstrap intervals, beside each variant's validation NLL, so a
variant is chosen on validation, never on test.

    python -m bench.blob_glr --g-lr 0.03 --study-runs runs/study-sst2-r2 --out bench/results/blob_glr.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.study import CONFIGS, run_config
from pyro_llm.evaluation import compute_metrics, paired_bootstrap
from pyro_llm.io import atomic_write_json
from pyro_llm.runs import evaluate, load_predictions, train


def cell(g_lr: float, seed: int, run_dir: Path) -> None:
    """Train one variant and record its N-sample predictive on the validation split."""
    if not (run_dir / "metrics.json").is_file():
        base = run_config(CONFIGS["cpu-sst2"], "sst2", seed, guide="blob")
        train(dataclasses.replace(base, optim=dataclasses.replace(base.optim, g_lr=g_lr)), run_dir, overwrite=True,
              progress=False)
    if "sst2/validation/val" not in json.loads((run_dir / "metrics.json").read_text()):
        evaluate(run_dir, split="validation", progress=False, record_as="val")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--g-lr", type=float, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--study-runs", required=True, help="a finished cpu-sst2 study's --runs-dir (its MAPs)")
    ap.add_argument("--runs-dir", default="runs/blob-glr")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)  # g_lr seed, in a child process
    args = ap.parse_args()
    root = Path(args.runs_dir)
    if args.cell:
        g, s = float(args.cell[0]), int(args.cell[1])
        cell(g, s, root / f"g{g:g}" / f"seed{s}")
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(args.seeds)))
    for g in args.g_lr:
        children = [subprocess.Popen([sys.executable, "-m", "bench.blob_glr", "--g-lr", str(g), "--study-runs",
                                      args.study_runs, "--runs-dir", str(root), "--out", args.out, "--cell", str(g),
                                      str(s)], env={**os.environ, "OMP_NUM_THREADS": threads})
                    for s in args.seeds]
        if any(c.wait() for c in children):
            raise SystemExit(f"a cell of g_lr {g} failed")
    study = Path(args.study_runs) / "sst2"
    maps = [load_predictions(study / f"seed{s}" / "map", "sst2/test") for s in args.seeds]
    map_probs, labels = torch.cat([p for p, _ in maps]), torch.cat([y for _, y in maps])
    report: dict[str, Any] = {"map": compute_metrics(map_probs, labels).as_dict()}
    for g in args.g_lr:
        runs = [root / f"g{g:g}" / f"seed{s}" for s in args.seeds]
        test = [load_predictions(r, "sst2/test") for r in runs]
        probs = torch.cat([p for p, _ in test])
        if not torch.equal(torch.cat([y for _, y in test]), labels):
            raise SystemExit("the BLoB runs and the study's MAPs saw other test examples")
        val = [json.loads((r / "metrics.json").read_text())["sst2/validation/val"] for r in runs]
        sigma = [json.loads((r / "scales.json").read_text())["all sites"]["mean"] for r in runs]
        report[f"blob g_lr {g:g}"] = {
            "validation_nll": sum(v["nll"] for v in val) / len(val), "sigma_mean": sigma,
            "test": compute_metrics(probs, labels).as_dict(),
            "vs_map": {m: dataclasses.asdict(d) for m, d in
                       paired_bootstrap(probs, map_probs, labels, metrics=("accuracy", "ece", "nll")).items()}}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
