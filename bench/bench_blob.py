"""BLoB's cost against plain peft LoRA, measured in one run.

* training step: BLoB (BLoBGuide + Flipout + MeanFieldELBO + AdamW/SGD, SVITrainer.step) against a plain peft
  LoRA step (cross-entropy on the answer logits + fused AdamW, the default optimiser of Hugging Face's
  Trainer) on the same model, batch and LoRA config;
  targets: time <= 1.05x, peak memory <= 1.05x; the same BLoB step without Flipout is timed too; the
  time ratio is the median over rounds of the two steps' ratio within a round (drift cancels; the
  three are timed in a shuffled order each round), with a distribution-free 95 % interval of that median;
* evaluation: N = 10 samples (batched) against one deterministic pass over the same examples;
* the variance of the ELBO's gradient with respect to the means M, with and without Flipout.

    python -m bench.bench_blob                                   # CPU, SmolLM2-135M
    python -m bench.bench_blob --model llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import pyro
import torch
from peft import LoraConfig, get_peft_model

from bench.common import (BayesianLoRAModel, answer_head, arc_batches, bench_parser, describe, interleaved, interleaved_samples,
                    load_base, medians, peak_memory, plain_lora_step, ratio_summary, report, subprocess_peak)
from pyro_llm.evaluation import predict_proba
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import MeanFieldELBO, OptimConfig, SVITrainer
from pyro_llm.poutine import flipout


def main() -> None:
    ap = bench_parser(__doc__, ["plain", "blob"], examples=8, repeats=30)
    ap.add_argument("--draws", type=int, default=30, help="ELBO gradient draws for the variance comparison")
    args = ap.parse_args()
    device = torch.device(args.device)
    base, tok = load_base(args.model, device, args.dtype)
    task, data = arc_batches(tok, max(args.batch_size, args.examples))
    head = answer_head(tok, task)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.eval()
    batch = data.batch(torch.arange(args.batch_size), device)

    # BLoB on the peft model: its A modules become sites
    model = BayesianLoRAModel(peft, head, dataset_size=len(data))
    guide = BLoBGuide(model)
    elbo = MeanFieldELBO()
    # the library's own training step (validation on the set-up pass only, Flipout, AdamW + SGD on G)
    trainer = SVITrainer(model, guide, OptimConfig(steps=10 ** 6, lr=1e-4, g_lr=1e-2), elbo=elbo, progress=False)
    # the same step without Flipout (plain reparametrisation): what Flipout itself costs
    no_flip = SVITrainer(model, guide, OptimConfig(steps=10 ** 6, lr=1e-4, g_lr=1e-2), elbo=elbo, progress=False,
                         use_flipout=False)
    counter = iter(range(10 ** 9))

    def blob_step() -> None:
        trainer.step(batch, next(counter))

    def no_flipout_step() -> None:
        no_flip.step(batch, next(counter))

    blob_step()  # creates the guide's parameters and B before the plain optimiser takes B

    plain_step = plain_lora_step(model, head, batch)  # plain peft LoRA on the same modules

    if args.memory_of:
        step = plain_step if args.memory_of == "plain" else blob_step
        print(f"PEAK {peak_memory(lambda: [step() for _ in range(2)], device)}")
        return
    if device.type == "cuda":
        plain_mem = peak_memory(plain_step, device)
        blob_mem = peak_memory(blob_step, device)
    else:  # process peak RSS is monotonic: measure each step in its own process
        plain_mem, blob_mem = (subprocess_peak(__spec__.name, v) for v in ("plain", "blob"))
    samples = interleaved_samples({"blob": blob_step, "plain": plain_step, "no_flipout": no_flipout_step}, args.repeats,
                                  device)
    times = medians(samples)
    step = ratio_summary(samples, "blob", "plain")
    no_flip_ratio = ratio_summary(samples, "no_flipout", "plain")

    variance = flipout_gradient_variance(model, guide, elbo, batch, draws=args.draws)

    evaluation = arc_batches(tok, args.examples)[1]
    ev = interleaved({
        "n10": lambda: predict_proba(model, guide, evaluation, num_samples=10, batch_size=args.batch_size,
                                     max_rows=64, progress=False),
        "deterministic": lambda: predict_proba(model, guide, evaluation, num_samples=0, batch_size=args.batch_size,
                                               progress=False),
    }, max(1, args.repeats // 2), device, warmup=1)
    report("blob", {
        "device": describe(device), "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size,
        "train_step_seconds": {"blob": times["blob"], "plain_peft_lora": times["plain"],
                               "blob_without_flipout": times["no_flipout"]},
        "train_step_time_ratio": step["median"],
        "train_step_time_ratio_median_ci95": step["median_ci95"],
        "train_step_time_ratio_quartiles": step["quartiles"],
        "train_step_time_ratio_without_flipout": no_flip_ratio["median"],
        "train_step_time_ratio_without_flipout_median_ci95": no_flip_ratio["median_ci95"],
        "train_step_time_ratio_of_medians": times["blob"] / times["plain"],
        "rounds": step["rounds"],
        "train_step_time_ratio_per_round": step["ratios"],
        "ratio_note": "train_step_time_ratio: median over rounds of the BLoB step over the plain step of the same "
                      "round (each round times the three kinds once, in a shuffled order); _median_ci95: a "
                      "distribution-free 95 % confidence interval of that median; _quartiles: the spread of "
                      "one round's ratio; _of_medians: ratio of the median times",
        "peak_memory_bytes": {"blob": blob_mem, "plain_peft_lora": plain_mem},
        "peak_memory_ratio": blob_mem / plain_mem,
        "memory_note": "CUDA: max_memory_allocated during one step; CPU: peak RSS of a process that loads the "
                       "model and runs two steps of one kind (the weights dominate)",
        "eval_seconds": ev, "eval_n10_over_deterministic": ev["n10"] / ev["deterministic"],
        "eval_examples": args.examples,
        "grad_variance_of_M": variance,
        "grad_variance_flipout_over_plain": variance["flipout"] / variance["plain"],
    }, args.out)


def flipout_gradient_variance(model, guide, elbo, batch, draws: int) -> dict[str, float]:
    """Total variance over draws of d(-ELBO)/dM (all sites), with and without Flipout, at a
    fine-tuned-like point (B ~ N(0, 0.02^2); with B = 0 the likelihood ignores A)."""
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.02)
    store = pyro.get_param_store()
    Ms = [store[f"{guide.prefix}.M"]]
    out = {}
    for name, use in (("flipout", True), ("plain", False)):
        grads = []
        for i in range(draws):
            pyro.set_rng_seed(1000 + i)
            for M in Ms:
                M.grad = None
            if use:
                with flipout():
                    loss = elbo.differentiable_loss(model, guide, **batch)
            else:
                loss = elbo.differentiable_loss(model, guide, **batch)
            loss.backward()
            grads.append(torch.cat([M.grad.flatten() for M in Ms]))
        out[name] = float(torch.stack(grads).var(0).sum())
    for p in store.values():
        p.grad = None
    return out


if __name__ == "__main__":
    main()
