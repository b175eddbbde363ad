"""Laplace-LoRA's cost, each figure a ratio measured in the same run.

* K-FAC fitting ("reduce", and "expand") against the floor: one forward and one backward pass per
  batch over the same data (target <= 1.1x in reduce mode);
* the GLM predictive against a plain forward pass (target <= 1 + C passes for C answer classes);
* factor memory: n_kfac * d, not d^2 (bytes of the kept factors against dense factors).

    python -m bench.bench_laplace                                # CPU, SmolLM2-135M, 64 ARC-Easy prompts
    python -m bench.bench_laplace --model llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from bench.common import (BayesianLoRAModel, answer_head, arc_batches, bench_parser, describe, fwd_bwd_floor, interleaved,
                    load_base, report)
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.evaluation.glm import glm_logit_moments
from pyro_llm.guides import LaplaceGuide
from pyro_llm.infer.laplace import blocks_from_factors


def main() -> None:
    ap = bench_parser(__doc__, [], examples=64, repeats=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    base, tok = load_base(args.model, device, args.dtype)
    task, data = arc_batches(tok, args.examples)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.eval()
    model = BayesianLoRAModel(peft, answer_head(tok, task), b_site=True, dataset_size=len(data))
    with torch.no_grad():  # a "trained" adapter: B off zero
        for s in model.sites:
            if s.matrix == "B":
                s.module.weight.normal_(0, 0.01)
    values = model.point_values()

    def floor() -> None:  # what K-FAC cannot avoid: one forward and one backward per batch
        fwd_bwd_floor(model, data, args.batch_size, device)

    def kfac(mode: str):
        return lambda: fit_kfac(model, data, KFACConfig(mode=mode, batch_size=args.batch_size), progress=False)

    fit_t = interleaved({"floor": floor, "reduce": kfac("reduce"), "expand": kfac("expand")}, args.repeats, device,
                        warmup=1)
    factors = fit_kfac(model, data, KFACConfig(batch_size=args.batch_size), progress=False)
    guide = LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)

    @torch.no_grad()
    def forward() -> None:
        for idx in data.sequential(args.batch_size):
            b = data.batch(idx, device)
            model.logits_at(b, values)

    glm_t = interleaved({"forward": forward,
                         "glm": lambda: glm_logit_moments(guide, data, batch_size=args.batch_size, progress=False)},
                        args.repeats, device, warmup=1)
    kept = sum((S.eigvecs.numel() + A.eigvecs.numel()) * 8 for S, A in factors.factors.values())
    dense = sum((S.dim ** 2 + A.dim ** 2) * 8 for S, A in factors.factors.values())
    report("laplace", {
        "device": describe(device), "model": args.model, "dtype": args.dtype, "examples": len(data),
        "batch_size": args.batch_size, "sites": len(model.sites), "classes": task.num_classes,
        "fit_seconds": fit_t,
        "kfac_reduce_over_fwd_bwd": fit_t["reduce"] / fit_t["floor"],
        "kfac_expand_over_fwd_bwd": fit_t["expand"] / fit_t["floor"],
        "glm_seconds": glm_t, "glm_over_forward": glm_t["glm"] / glm_t["forward"],
        "glm_bound_1_plus_C": 1 + task.num_classes,
        "factor_bytes": {"low_rank_n_kfac_10": kept, "dense": dense}, "factor_memory_ratio": kept / dense,
    }, args.out)


if __name__ == "__main__":
    main()
