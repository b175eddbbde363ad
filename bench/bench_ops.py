"""The GPU's cost without a GPU: kernel ops, host syncs and bytes written of one BLoB training step
against one plain peft LoRA step, and of a K-FAC fit against one forward + backward over the
same batches (the floor any K-FAC fit pays), counted on the CPU (:mod:`bench.opcount`). The
counts are deterministic and do not depend on the model's width, only on its layer count, so a
narrow Llama with a real model's 16 layers stands in for Llama-3.2-1B.

The BLoB step is counted twice: with the CPU's Flipout signs (a table lookup, one random draw per 32
signs) and with the GPU's (one ``randint`` per sign in the activation dtype, no gather), which is
the count that stands for CUDA launches.

Targets (the CUDA issue): BLoB / LoRA <= 1.15 in kernel ops with <= 2 host syncs a step; K-FAC /
floor <= 1.05 with no linear algebra or host sync per batch (checked by fitting on twice the
batches: the linalg calls must not grow, nor the host syncs beyond those of the floor's own forward).

Usage::

    python -m bench.bench_ops                                   # 16 layers, JSON on stdout
    python -m bench.bench_ops --out bench/results/ops_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pyro
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.opcount import VIEWS, OpCounter, count
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.data.collate import EncodedDataset
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import AnswerTokenHead, BayesianLoRAModel
from pyro_llm.poutine.flipout import SIGN_METHODS


def _model(layers: int, hidden: int) -> BayesianLoRAModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    peft = get_peft_model(LlamaForCausalLM(cfg).eval(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.eval()
    return BayesianLoRAModel(peft, AnswerTokenHead([10, 11, 12, 13]), dataset_size=1000)


def _data(n: int, tokens: int) -> EncodedDataset:
    gen = torch.Generator().manual_seed(0)
    return EncodedDataset(torch.randint(20, 500, (n, tokens), generator=gen), torch.ones(n, tokens, dtype=torch.long),
                          torch.randint(0, 4, (n,), generator=gen), torch.ones(n, 4, dtype=torch.bool))


def measure(layers: int = 16, hidden: int = 64, tokens: int = 70, batch: int = 4) -> dict[str, Any]:
    """Counts of one BLoB step, one plain LoRA step, a K-FAC fit and its floor (4 and 8 batches)."""
    pyro.clear_param_store()
    model = _model(layers, hidden)
    data = _data(8 * batch, tokens)
    b = data.batch(torch.arange(batch))
    trainer = SVITrainer(model, BLoBGuide(model), OptimConfig(steps=10 ** 6, lr=1e-4, g_lr=1e-2), progress=False)
    steps = iter(range(10 ** 9))

    def blob_step() -> None:
        trainer.step(b, next(steps))

    blob_step()
    lora = [s.module.weight for s in model.sites] + list(model.params.values())
    opt = torch.optim.AdamW(lora, lr=1e-4, fused=True)

    def plain_step() -> None:  # peft LoRA as Hugging Face trains it: A and B parameters, cross-entropy
        for w in lora[:len(model.sites)]:
            w.requires_grad_(True)
        logits = model.head(model.peft_model, b["input_ids"], b["attention_mask"]).float()
        torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for w in lora[:len(model.sites)]:
            w.requires_grad_(False)

    plain, blob = count(plain_step), count(blob_step)
    SIGN_METHODS["cpu"] = "randint"  # the signs as a GPU makes them
    try:
        blob_gpu_path = count(blob_step)
    finally:
        SIGN_METHODS["cpu"] = "table"

    def kfac(n_batches: int) -> OpCounter:
        sub = _data(n_batches * batch, tokens)
        return count(lambda: fit_kfac(model, sub, KFACConfig(n_kfac=10, batch_size=batch), progress=False), warmup=1)

    def floor(n_batches: int) -> OpCounter:
        sub = _data(n_batches * batch, tokens)
        values = model.point_values()

        def run() -> None:
            for idx in sub.sequential(batch):
                x = sub.batch(idx)
                logits = model.logits_at(x, {k: v.detach().requires_grad_(True) for k, v in values.items()})
                torch.nn.functional.cross_entropy(logits, x["labels"], reduction="sum").backward()
        return count(run, warmup=1)

    k4, k8, f4, f8 = kfac(4), kfac(8), floor(4), floor(8)
    extra = {k: blob.ops[k] - plain.ops.get(k, 0) for k in blob.ops
             if blob.ops[k] > plain.ops.get(k, 0) and k not in VIEWS}
    return {
        "setup": {"layers": layers, "hidden": hidden, "tokens": tokens, "batch": batch, "sites": len(model.sites),
                  "torch": torch.__version__},
        "step": {"plain": plain.summary(), "blob": blob.summary(), "kernel_ratio": blob.kernels / plain.kernels,
                 "bytes_ratio": blob.bytes_written / plain.bytes_written,
                 "extra_kernels_per_site": (blob.kernels - plain.kernels) / len(model.sites),
                 "kernel_ratio_gpu_sign_path": blob_gpu_path.kernels / plain.kernels,
                 "top_extra": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:12])},
        "kfac": {"fit_4_batches": k4.summary(), "floor_4_batches": f4.summary(),
                 "kernel_ratio": k4.kernels / f4.kernels,
                 "linalg_growth_4_to_8_batches": sum(k8.linalg.values()) - sum(k4.linalg.values()),
                 # the model's own forward syncs (transformers' mask checks) grow with the batches in the floor too
                 "host_sync_growth_beyond_floor_4_to_8_batches": (k8.host_syncs - k4.host_syncs)
                 - (f8.host_syncs - f4.host_syncs)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=70)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = measure(a.layers, a.hidden, a.tokens, a.batch)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
