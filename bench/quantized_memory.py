"""Memory of a quantized base and of activation checkpointing, as ratios against the float32 base
without checkpointing measured in the same run.

For each base (float32, int8, nf4) one child process loads the model with LoRA r 8 on q/v and
reports: the bytes of the quantized linear layers against the same layers in float32 (weights and
quantization constants counted, :func:`pyro_llm.models.quantize.quantized_linear_bytes`); the whole
model's bytes (parameters, buffers, quantization constants); and the process's peak resident memory
after loading and after training steps of a plain LoRA (MAP) and of BLoB, and the peak bytes the
allocator holds during one more training step above what it held before it (torch's profiler:
activations, gradients, transients; exact, and free of the loading's history, which the resident
peak is not). Then, on the float32 base, the same with and without activation checkpointing at two
sequence lengths (``--lengths``). The trained batch is ``--batch-size`` rows of exactly
``--max-length`` tokens (ARC-Easy prompts filled up with random tokens). Each configuration runs in
its own process.

    python -m bench.quantized_memory --out bench/results/quantized_memory_cpu.json
    python -m bench.quantized_memory --model tests-tiny-folder --steps 1 --out /tmp/q.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

KINDS = ("float32", "int8", "nf4")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(model_name: str, kind: str, guide: str, steps: int, batch_size: int, max_length: int,
          checkpointing: bool = False) -> dict[str, Any]:
    """One configuration in this process: sizes, then the peak after ``steps`` training steps."""
    import pyro
    import torch

    from bench.common import allocator_peak
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.infer import OptimConfig, SVITrainer
    from pyro_llm.models.quantize import quantized_linear_bytes, stored_bytes
    from pyro_llm.runs import make_guide
    from pyro_llm.models import build_model

    torch.set_num_threads(1)
    task = get_task("arc-easy")
    examples = load_examples(task, "train", limit=batch_size * max(steps, 1))
    model, tok = build_model(model_name, task, dataset_size=len(examples), quantize=None if kind == "float32" else kind,
                             gradient_checkpointing=checkpointing)
    out: dict[str, Any] = {"model_bytes": stored_bytes(model.peft_model), "peak_after_load": _peak_bytes()}
    if kind != "float32":
        out["quantized_linear_bytes"], out["as_float32_bytes"] = quantized_linear_bytes(model.peft_model)
    data = encode_examples(examples, tok, task.num_classes, max_length)
    pyro.clear_param_store()
    g = make_guide(guide, model, blob_eps=0.05, sigma_param="square", normal_init_scale=0.01)
    trainer = SVITrainer(model, g, OptimConfig(steps=steps + 1, batch_size=batch_size, lr=1e-4), progress=False)
    batch = data.batch(torch.arange(batch_size), model.device)
    # every row exactly max_length tokens (random ids after the prompt's): memory at a known length
    gen = torch.Generator().manual_seed(0)
    filler = torch.randint(len(tok), (batch_size, max_length), generator=gen).to(model.device)
    n = min(batch["input_ids"].shape[1], max_length)
    filler[:, :n] = batch["input_ids"][:, :n]
    batch = dict(batch, input_ids=filler, attention_mask=torch.ones_like(filler))
    out["tokens"] = max_length
    for i in range(steps):
        trainer.step(batch, i)
    out["peak_after_training"] = _peak_bytes()
    # one more step (optimiser state already there) under the profiler: its own allocations
    out["step_allocator_peak"] = allocator_peak(lambda: trainer.step(batch, steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", type=int, nargs=2, default=[128, 512], help="sequence lengths of the checkpointing runs")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "GUIDE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child[0], args.child[1], args.steps, args.batch_size,
                               args.max_length, args.child[2] == "1")))
        return

    def run(kind: str, guide: str, length: int, checkpointing: bool) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "bench.quantized_memory", "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(length), "--child", kind, guide,
               "1" if checkpointing else "0"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    results: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        for guide in ("map", "blob"):
            results[f"{kind}/{guide}"] = run(kind, guide, args.max_length, False)
    checkpointing: dict[str, Any] = {}
    for length in args.lengths:
        for guide in ("map", "blob"):
            plain, ckpt = run("float32", guide, length, False), run("float32", guide, length, True)
            checkpointing[f"{guide}/{length} tokens"] = {
                "step allocator peak with / without checkpointing":
                    ckpt["step_allocator_peak"] / plain["step_allocator_peak"],
                "peak RSS with / without checkpointing": ckpt["peak_after_training"] / plain["peak_after_training"],
                "raw": {"without": plain, "with": ckpt}}
    base = results["float32/map"]
    report: dict[str, Any] = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                              "max_length": args.max_length, "raw": results, "ratios": {},
                              "checkpointing": checkpointing}
    for key, r in results.items():
        kind = key.split("/")[0]
        ratios = {"whole model bytes / float32": r["model_bytes"] / base["model_bytes"],
                  "training peak RSS / float32 LoRA": r["peak_after_training"] / base["peak_after_training"],
                  "step allocator peak / float32 LoRA": r["step_allocator_peak"] / base["step_allocator_peak"]}
        if kind != "float32":
            ratios["quantized linear bytes / their float32"] = r["quantized_linear_bytes"] / r["as_float32_bytes"]
        report["ratios"][key] = ratios
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps(report["ratios"], indent=2))
    print(json.dumps({k: {m: v[m] for m in v if m != "raw"} for k, v in checkpointing.items()}, indent=2))


if __name__ == "__main__":
    main()
