"""BLoB and Laplace at the scale people fine-tune: an 8B-shaped Llama (Llama-3.1-8B's layout,
random weights: no download) in bfloat16 and in 4-bit NF4, each figure a ratio against a baseline
measured in the same run.

For each base:

* training step: BLoB (``BLoBGuide`` + Flipout + ``MeanFieldELBO``, the library's ``SVITrainer.step``)
  against a plain peft LoRA step (cross-entropy on the answer logits + fused AdamW) on the same
  model, batch and LoRA (r 8 on q/v); time as the median of per-round ratios (timed alternately,
  distribution-free 95 % interval) and peak memory of each step (CUDA's peak allocated bytes,
  weights included: what a user must fit). Targets on a GPU: nf4 time <= 1.10x, memory <= 1.05x;
* the K-FAC fit (``reduce``, A and B sites) against its floor, one forward and one backward per
  batch over the same examples.

    python -m bench.gpu_scale --out bench/results/gpu_scale_h100.json       # on a GPU
    python -m bench.gpu_scale --smoke                                        # CPU: a tiny Llama, same code

``--smoke`` runs every measurement on a two-layer Llama of the same layout on the CPU, with two
timing rounds: it checks the script, not the hardware (the suite runs it).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import pyro
import torch
from peft import LoraConfig, get_peft_model

from bench.common import (BayesianLoRAModel, answer_head, arc_batches, describe, fwd_bwd_floor, interleaved,
                          interleaved_samples, medians, peak_memory, plain_lora_step, ratio_summary, report)
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import MeanFieldELBO, OptimConfig, SVITrainer
from pyro_llm.models import load_causal_lm
from pyro_llm.models.quantize import quantization_config, stored_bytes

#: Llama-3.1-8B's shapes (random weights)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)
#: the same layout at toy size, for ``--smoke``
LLAMA_SMOKE = dict(LLAMA_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
BASES = ("bfloat16", "nf4")


def _quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the decoder's linear layers by bitsandbytes NF4 layers holding the same weights, as a
    quantized load does (transformers keeps ``lm_head`` in the compute dtype)."""
    import bitsandbytes as bnb

    cfg = quantization_config("nf4", compute_dtype)
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=cfg.bnb_4bit_quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                         quant_type=cfg.bnb_4bit_quant_type).to(device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
            del child
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def base_model(shape: dict[str, Any], kind: str, device: torch.device, dtype: torch.dtype):
    """A random-init Llama of ``shape`` in ``dtype``, its decoder's linear layers in NF4 for ``nf4``;
    frozen, with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = load_causal_lm("smollm2-135m", device="cpu")
    cfg = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tok))})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if kind == "nf4":
        _quantize_linears(model, dtype, device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def measure(kind: str, shape: dict[str, Any], device: torch.device, dtype: torch.dtype, batch_size: int,
            examples: int, repeats: int) -> dict[str, Any]:
    base, tok = base_model(shape, kind, device, dtype)
    task, data = arc_batches(tok, max(batch_size, examples))
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.eval()
    head = answer_head(tok, task)
    batch = data.batch(torch.arange(batch_size), device)
    pyro.clear_param_store()
    model = BayesianLoRAModel(peft, head, dataset_size=len(data))
    guide = BLoBGuide(model)
    trainer = SVITrainer(model, guide, OptimConfig(steps=10 ** 6, lr=1e-4, g_lr=1e-2), elbo=MeanFieldELBO(),
                         progress=False)
    counter = iter(range(10 ** 9))

    def blob_step() -> None:
        trainer.step(batch, next(counter))

    blob_step()  # the guide's parameters exist before the plain optimiser takes B
    plain_step = plain_lora_step(model, head, batch, fused=device.type == "cuda")  # A and B, as BLoB trains

    times = interleaved_samples({"lora": plain_step, "blob": blob_step}, repeats, device, warmup=2 if repeats > 1 else 0)
    memory = {"lora": peak_memory(plain_step, device), "blob": peak_memory(blob_step, device)}
    # K-FAC over A and B at a "trained" point, against one forward and backward per batch
    kfac_model = BayesianLoRAModel(peft, head, b_site=True, dataset_size=len(data))
    with torch.no_grad():
        for s in kfac_model.sites:
            if s.matrix == "B":
                s.module.weight.normal_(0, 0.01)
    cfg = KFACConfig(batch_size=batch_size)
    kfac_times = interleaved({"kfac": lambda: fit_kfac(kfac_model, data, cfg, progress=False),
                              "floor": lambda: fwd_bwd_floor(kfac_model, data, batch_size, device)},
                             max(1, repeats // 10), device, warmup=1 if repeats > 1 else 0)
    result = {
        "base": kind, "model_bytes": stored_bytes(base), "batch": batch_size,
        "tokens_per_batch": int(batch["attention_mask"].numel()), "kfac_examples": len(data),
        "step_seconds": medians(times), "blob_over_lora_time": ratio_summary(times, "blob", "lora"),
        "peak_bytes": memory, "blob_over_lora_memory": memory["blob"] / memory["lora"],
        "kfac_seconds": kfac_times, "kfac_over_floor": kfac_times["kfac"] / kfac_times["floor"]}
    return result  # the models go with this frame (main collects them before the next base)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama of the same layout on the CPU, two rounds")
    ap.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--examples", type=int, default=16, help="examples of the K-FAC fit")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)
    if args.smoke:
        device, shape, repeats = torch.device("cpu"), LLAMA_SMOKE, 2
        args.examples = args.batch_size
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.gpu_scale measures a GPU; none is visible (use --smoke on the CPU)")
        device, shape, repeats = torch.device("cuda"), LLAMA_8B, args.repeats
    runs = []
    for kind in args.bases:
        runs.append(measure(kind, shape, device, torch.bfloat16, args.batch_size, args.examples, repeats))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = {"device": describe(device), "shape": shape, "smoke": args.smoke, "runs": runs}
    report("gpu_scale", results, args.out)
    return results


if __name__ == "__main__":
    main()
