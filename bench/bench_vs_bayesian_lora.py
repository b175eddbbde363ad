"""pyro-llm's K-FAC against ``bayesian-lora`` 0.0.6 on the same model and data (a benchmark-only
dependency: ``pip install --no-deps bayesian-lora==0.0.6 jaxtyping``).

SmolLM2-135M, LoRA r = 8 on q/v, 64 ARC-Easy prompts, batch 4, as in the issue. Reported, each
measured in this run: factor-fitting time of both against one forward + backward pass over the
same data, peak memory of each fit in its own process (CPU: peak RSS; CUDA: max allocated), and
the log evidence each library reports for its posterior at the same prior precision.
``bayesian-lora`` keeps only the last position's activations and gradients and needs left-padded
prompts for that; pyro-llm uses every real token ("reduce"). Both forward passes apply the output
layer to the last position only. Its evidence formula is the one its
issue #4 questions; both are printed side by side without reconciling them.

    python bench/bench_vs_bayesian_lora.py --out bench/results/vs_bayesian_lora_cpu.json
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from common import (BayesianLoRAModel, answer_head, arc_batches, bench_parser, describe, fwd_bwd_floor, interleaved,
                    load_base, peak_memory, report, subprocess_peak)
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.guides import LaplaceGuide
from pyro_llm.infer.laplace import blocks_from_factors


def setup(args):
    device = torch.device(args.device)
    base, tok = load_base(args.model, device, args.dtype)
    task, data = arc_batches(tok, args.examples)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    head = answer_head(tok, task)
    # bayesian-lora reads position -1: give it left-padded batches of the same prompts
    tok.padding_side = "left"
    from pyro_llm.data import load_examples

    texts = [e.text for e in load_examples(task, "train", limit=args.examples)]
    left = [tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
            for i in range(0, len(texts), args.batch_size)]
    return device, peft, head, task, data, left


def theirs(peft, head, left, device):
    from bayesian_lora import calculate_kronecker_factors

    ids = head.token_ids.to(device)

    def forward_call(model, batch):
        # the same work as pyro-llm's head: the output layer on the last (left-padded) position only
        base = model.get_base_model()
        hidden = getattr(base, base.base_model_prefix)(input_ids=batch["input_ids"].to(device),
                                                       attention_mask=batch["attention_mask"].to(device))
        return base.get_output_embeddings()(hidden.last_hidden_state[:, -1])[:, ids].float()

    return calculate_kronecker_factors(peft, forward_call, left, n_kfac=10, lr_threshold=512,
                                       target_module_keywords=["lora"])


def main() -> None:
    ap = bench_parser(__doc__, ["ours", "theirs", "floor"], examples=64, repeats=2)
    args = ap.parse_args()
    device, peft, head, task, data, left = setup(args)
    # bayesian-lora hooks nn.Linear modules named *lora*: it gets an untouched copy of the same adapter
    # (not made in the per-process memory runs, where each process holds one model)
    peft_plain_forward = peft if args.memory_of else copy.deepcopy(peft)
    their_fit = lambda: theirs(peft_plain_forward, head, left, device)  # noqa: E731
    if args.memory_of == "theirs":
        print(f"PEAK {peak_memory(their_fit, device)}")
        return
    model = BayesianLoRAModel(peft, head, b_site=True, dataset_size=len(data))
    ours = lambda: fit_kfac(model, data, KFACConfig(mode="reduce", batch_size=args.batch_size), progress=False)  # noqa: E731

    def floor() -> None:
        fwd_bwd_floor(model, data, args.batch_size, device)

    if args.memory_of:
        print(f"PEAK {peak_memory(ours if args.memory_of == 'ours' else floor, device)}")
        return
    times = interleaved({"floor": floor, "ours": ours, "theirs": their_fit}, args.repeats, device, warmup=1)
    mem = {who: subprocess_peak(__file__, who) for who in ("floor", "ours", "theirs")}

    # evidence at the same prior precision (lambda = 1, prior variance s2 = 1)
    factors = ours()
    guide = LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)
    our_lml = float(guide.log_marginal_likelihood(factors.log_likelihood))
    from bayesian_lora import model_evidence

    their_factors = their_fit()
    try:
        their_lml: float | str = float(model_evidence(peft_plain_forward, torch.tensor(factors.log_likelihood),
                                                      their_factors, 8, 10, torch.tensor(1.0)))
    except AssertionError as err:  # its calc_M asserts low-rank factors everywhere
        their_lml = f"model_evidence failed: AssertionError {err} (a factor below lr_threshold is kept full rank)"
    report("vs_bayesian_lora", {
        "device": describe(device), "model": args.model, "examples": len(data), "batch_size": args.batch_size,
        "fit_seconds": times, "ours_over_fwd_bwd": times["ours"] / times["floor"],
        "theirs_over_fwd_bwd": times["theirs"] / times["floor"], "ours_over_theirs": times["ours"] / times["theirs"],
        "peak_memory_bytes": mem, "memory_ours_over_theirs": mem["ours"] / mem["theirs"],
        "log_evidence_at_lambda_1": {"pyro_llm": our_lml, "bayesian_lora": their_lml},
        "note": "bayesian-lora: last position only, its own evidence formula; pyro-llm: all real tokens (reduce), "
                "algorithms.md's evidence",
    }, args.out)


if __name__ == "__main__":
    main()
