"""Cloze prediction with each question's context encoded once, against whole rows (one per choice).

:class:`pyro_llm.models.ChoiceLikelihoodHead` runs a question's shared context once at prediction
and its choices after it from the cached keys and values. This measures, per cloze task, the token
positions both passes compute (exact, from the batches :meth:`EncodedDataset.by_length` forms) and
the time of a prediction pass over the same questions, the two timed in alternation (ratio whole /
shared above 1: the shared context is faster), and the largest difference of their logits.

    python -m bench.cloze_context --out bench/results/cloze_context_cpu.json
    python -m bench.cloze_context --device cuda --dtype bfloat16 --out bench/results/cloze_context_cuda.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import interleaved_samples, ratio_summary
from pyro_llm.data import EncodedDataset, encode_examples, get_task, load_examples
from pyro_llm.evaluation.predictive import mean_logits
from pyro_llm.models import ChoiceLikelihoodHead, build_model, resolve_device

#: (task, test questions) at the study's max_length of 128
CASES = [("hellaswag-cloze", 48), ("piqa-cloze", 96), ("social-iqa-cloze", 96), ("arc-easy-cloze", 96)]


def positions(data: EncodedDataset, batch_size: int) -> dict[str, int]:
    """Token positions a pass computes with whole rows and with each question's context once (in the
    batches where the head shares it, by its own :meth:`ChoiceLikelihoodHead.context_plan`)."""
    whole = shared = 0
    for idx in data.by_length(batch_size):
        b = data.batch(idx)
        n, k, t = b["input_ids"].shape
        plan = ChoiceLikelihoodHead.context_plan(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        whole += n * k * t
        shared += n * k * t if plan is None else n * (plan[1] + k * plan[2])
    return {"whole": whole, "shared": shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = resolve_device(args.device)
    results = {}
    for name, limit in CASES:
        task = get_task(name)
        model, tok = build_model(args.model, task, device=device, dtype=args.dtype)
        torch.manual_seed(0)
        with torch.no_grad():  # a trained-looking adapter, so the LoRA path counts
            for s in model.sites:
                s.layer.lora_B[model.adapter].weight.normal_(0, 0.02)
        values = {s.name: s.layer.lora_A[model.adapter].weight.detach().clone() for s in model.sites}
        data = encode_examples(load_examples(task, "test", limit=limit), tok, task.num_classes, 128)
        logits = {}

        def run(share: bool) -> None:
            model.head.share_context = share
            logits[share] = mean_logits(model, values, data, batch_size=args.batch_size, device=device)

        times = interleaved_samples({"whole": lambda: run(False), "shared": lambda: run(True)}, args.repeats,
                                    device, warmup=1)
        results[name] = {"questions": len(data), "positions": positions(data, args.batch_size),
                         "whole_over_shared": ratio_summary(times, "whole", "shared"),
                         "max_abs_logit_difference": float((logits[True] - logits[False]).abs().max())}
        r = results[name]
        print(f"{name}: {r['questions']} questions, positions {r['positions']['whole']} -> {r['positions']['shared']}, "
              f"time whole / shared {r['whole_over_shared']['median']:.2f} {r['whole_over_shared']['median_ci95']}, "
              f"max |logit difference| {r['max_abs_logit_difference']:.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "dtype": args.dtype, "model": args.model,
                                        "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
