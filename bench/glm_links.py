"""The linearised predictive of a Laplace run under each link from logit moments to probabilities,
and whether each is invariant to a common offset of the logits (the exact predictive is).

One GLM pass over the run's test split gives ``f ~ N(mu, Sigma)`` per example; then, on the same
moments: the per-class probit ``softmax(mu / sqrt(1 + pi/8 diag Sigma))`` (the form pyro-llm used
before, kept here as the reference), :func:`pyro_llm.evaluation.glm.probit_probs` (the probit of the
logits' differences), and Monte Carlo over the logits (exact up to sampling error), each also with
every logit shifted by ``--shift`` nats. A cloze head's logits are summed log-likelihoods, far from
zero, which is where the per-class form goes wrong.

    python -m bench.glm_links runs/study-piqa/piqa-cloze/seed0/laplace-marglik --out bench/results/glm_links_piqa.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from pyro_llm.evaluation import compute_metrics
from pyro_llm.evaluation.glm import glm_logit_moments, mc_probs, probit_probs
from pyro_llm.io import atomic_write_json
from pyro_llm.runs import load_run, load_split, retarget_head


def per_class_probit(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The per-class form, not invariant to a common offset (pyro-llm's link until this release)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished Laplace run")
    ap.add_argument("--shift", type=float, default=-100.0, help="nats added to every logit")
    ap.add_argument("--mc-samples", type=int, default=20_000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = load_run(args.run)
    retarget_head(run, run.task)
    data = load_split(run.config, run.task, "test", run.tokenizer, None)
    mean, cov = glm_logit_moments(run.guide, data, batch_size=run.lconfig.batch_size, progress=False)
    mean, cov = mean.double(), cov[0].double()
    links = {"per-class probit": per_class_probit, "probit of differences": probit_probs,
             "monte carlo": lambda m, c: mc_probs(m, c, args.mc_samples, torch.Generator().manual_seed(0))}
    report: dict[str, object] = {"run": args.run, "n": len(data), "shift": args.shift,
                                 "median |logit|": float(mean.abs().median()),
                                 "map": compute_metrics(mean.softmax(-1), data.labels).as_dict()}
    for name, link in links.items():
        for shift in (0.0, args.shift):
            m = compute_metrics(link(mean + shift, cov).double(), data.labels)
            report[f"{name}, shift {shift:g}"] = m.as_dict()
            print(f"{name:24s} shift {shift:6g}: accuracy {m.accuracy:6.2f}  ECE {m.ece:6.2f}  NLL {m.nll:.4f}")
    atomic_write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
