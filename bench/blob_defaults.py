"""Why BLoB lost to MAP on SmolLM2: ``G``'s learning rate and the prior scale, one cell at a time.

Trains the MAP and BLoB variants of one ``cpu-sst2`` study cell (SmolLM2-135M as a classifier on
SST-2, 150 steps of batch 8, lr 1e-3, exact ELBO) with the training cut given by ``--fractions``,
and writes each variant's test metrics, its final NLL and KL parts of the loss and its ``sigma``
summary to ``--out``. Each variant is a plain :func:`pyro_llm.runs.train` call with one option
changed, so the table answers "which default is the cause" without the rest of the study.

    python -m bench.blob_defaults --fractions 0.2,0.2,0.6 --out bench/results/blob_defaults_sst2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from bench.study import CONFIGS, run_config
from pyro_llm.io import atomic_write_json
from pyro_llm.runs import PriorConfig, SVIConfig, train

#: variant name -> (guide, change applied to the study cell's configuration)
VARIANTS: dict[str, tuple[str, Any]] = {
    "map": ("map", lambda cfg: cfg),
    "blob g_lr 0.1": ("blob", lambda cfg: dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, g_lr=0.1))),
    "blob g_lr 0.01": ("blob", lambda cfg: dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, g_lr=0.01))),
    "blob prior 0.05": ("blob", lambda cfg: dataclasses.replace(cfg, prior=PriorConfig(scale=0.05))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.2,0.2,0.6", help="train,validation,test cut of SST-2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--runs-dir", default="runs/blob-defaults")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    c = dict(CONFIGS["cpu-sst2"], fractions={"sst2": tuple(float(x) for x in args.fractions.split(","))})
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.variants:
        guide, change = VARIANTS[name]
        cfg: SVIConfig = change(run_config(c, "sst2", args.seed, guide=guide))
        run_dir = Path(args.runs_dir) / name.replace(" ", "-")
        t0 = time.perf_counter()
        metrics = train(cfg, run_dir, overwrite=True, progress=False)["sst2/test"]
        last = json.loads((run_dir / "history.json").read_text())[-1]
        scales = run_dir / "scales.json"
        results[name] = {"test": metrics, "final_nll": last["nll"], "final_kl_per_example": last["kl"],
                         "sigma": json.loads(scales.read_text())["all sites"] if scales.is_file() else None,
                         "seconds": time.perf_counter() - t0, "fractions": args.fractions, "seed": args.seed}
        atomic_write_json(out, results)
        print(name, results[name], flush=True)


if __name__ == "__main__":
    main()
