"""The GLM pass's memory and time against its token bound (``LaplaceConfig.glm_max_tokens``) and
its Jacobian route.

The linearised predictive holds a batch's whole forward graph and its backward, so its memory
grows with the batch's padded tokens; a cloze question is one sequence per choice. A cloze head's
rows are its classes, so one backward gives every class's Jacobian (route ``rows``, the default
for it); the generic route (``classes``) runs a batched backward per class, C backwards' work and
memory. Each (route, bound) runs in a process of its own (a process's peak RSS cannot be reset):
it loads the Laplace run and the examples, notes its peak RSS so far (the floor: model and data),
runs one GLM pass, and notes the peak again. Reported per cell: the pass's own peak above the
floor and its seconds, each as a ratio against the generic route without a bound (``classes``,
``0``) measured in the same invocation, one process after another on an otherwise idle machine.

    python -m bench.glm_memory runs/study-piqa/piqa-cloze/seed1/laplace-marglik --task hellaswag-cloze \\
        --limit 16 --max-tokens 0 1024 --out bench/results/glm_memory_hellaswag.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from bench.common import ROOT, child_output, report


def _one(run_dir: str, task: str, limit: int, max_tokens: int, route: str) -> dict[str, float]:
    from pyro_llm.data import get_task
    from pyro_llm.evaluation.glm import glm_logit_moments
    from pyro_llm.runs import load_run, load_split, retarget_head

    run = load_run(run_dir)
    spec = get_task(task)
    retarget_head(run, spec)
    if route == "classes":  # the generic route: one (batched) backward per class
        run.model.head.rows_are_classes = False
    data = load_split(run.config, spec, "test", run.tokenizer, limit)
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    mean, cov = glm_logit_moments(run.guide, data, batch_size=run.lconfig.batch_size,
                                  max_tokens=max_tokens or None, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"floor_bytes": floor, "peak_bytes": peak, "pass_bytes": peak - floor, "seconds": seconds,
            "batches": len(data.by_length(run.lconfig.batch_size, max_tokens or None)),
            "mean_abs_sum": float(mean.abs().sum()), "cov_abs_sum": float(cov.abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished Laplace run")
    ap.add_argument("--task", default=None, help="default: the run's own task")
    ap.add_argument("--limit", type=int, default=16, help="test examples in the pass")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[0, 2048, 1024], help="bounds; 0: none (the baseline)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # a child: measure ROUTE BOUND
    args = ap.parse_args()
    if args.one is not None:
        task = args.task or json.loads((ROOT / args.run / "config.json").read_text())["run"]["task"]
        print("RESULT " + json.dumps(_one(args.run, task, args.limit, int(args.one[1]), args.one[0])))
        return
    bounds = [0] + [b for b in args.max_tokens if b != 0]
    cells = [(route, b) for route in ("classes", "rows") for b in bounds]  # first: the baseline, classes/none
    child = ["bench.glm_memory", args.run, "--limit", str(args.limit)]
    child += ["--task", args.task] if args.task else []
    measured = {f"{route}/{bound or 'none'}": json.loads(child_output([*child, "--one", route, str(bound)], "RESULT"))
                for route, bound in cells}
    base = measured["classes/none"]
    report("glm_memory", {
        "run": args.run, "task": args.task, "limit": args.limit, "torch_threads": torch.get_num_threads(),
        "baseline": "classes/none", "by_cell": measured,
        "pass_memory_ratio": {k: m["pass_bytes"] / base["pass_bytes"] for k, m in measured.items()},
        "seconds_ratio": {k: m["seconds"] / base["seconds"] for k, m in measured.items()},
    }, args.out)


if __name__ == "__main__":
    main()
