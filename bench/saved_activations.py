"""What a forward under a gradient keeps for its backward, per padded token, by kind of tensor.

Training steps, K-FAC and the GLM pass all hold one forward graph per batch, so their memory grows
with the batch's padded tokens. This counts the tensors autograd saves for the backward of one
batch's class logits (``torch.autograd.graph.saved_tensors_hooks``; each storage once, the
model's own weights left out), grouped by their last dimension (the MLP's width, the model's
width, ``lora_A``'s rank...), 4-d attention tensors and vocabulary logits, and reports bytes per
padded token against the pass's total: a measurement of the activations, not an estimate.

    python -m bench.saved_activations --task piqa-cloze --out bench/results/saved_activations_piqa.json
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from bench.common import report


def saved_bytes(model, batch: dict[str, torch.Tensor]) -> Counter[str]:
    """Bytes saved for the backward of ``model.logits_at(batch)``, by kind of tensor."""
    weights = {p.untyped_storage().data_ptr() for p in model.peft_model.parameters()}
    vocab = model.peft_model.get_output_embeddings().weight.shape[0]
    seen: set[int] = set()
    kinds: Counter[str] = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in weights:
            seen.add(ptr)
            last = t.shape[-1] if t.dim() else 0
            kind = "vocabulary logits" if last == vocab else "attention (4-d)" if t.dim() == 4 else f"width {last}"
            kinds[kind] += t.untyped_storage().nbytes()
        return t

    values = {k: v.detach().requires_grad_(True) for k, v in model.point_values().items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.logits_at(batch, values)
    return kinds


def main() -> None:
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import build_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="piqa-cloze")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8, help="questions in the batch (the longest such batch)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    task = get_task(args.task)
    model, tok = build_model(args.model, task)
    data = encode_examples(load_examples(task, "train", limit=64), tok, task.num_classes, max_length=args.max_length)
    batch = max((data.batch(idx) for idx in data.by_length(args.batch_size)), key=lambda b: b["input_ids"].numel())
    tokens = batch["input_ids"].numel()
    kinds = saved_bytes(model, batch)
    total = sum(kinds.values())
    report("saved_activations", {
        "task": args.task, "model": args.model, "batch_shape": list(batch["input_ids"].shape), "padded_tokens": tokens,
        "saved_bytes": total, "bytes_per_token": total / tokens,
        "bytes_per_token_by_kind": {k: v / tokens for k, v in kinds.most_common()},
    }, args.out)


if __name__ == "__main__":
    main()
