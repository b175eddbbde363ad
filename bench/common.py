"""Shared benchmark helpers: models of realistic size, batches, timing and memory as ratios.

Every figure is a ratio against a baseline measured in the same process and run, with the two
timed alternately (``interleaved``) so that machine drift hits both alike.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]  # the project root, from which ``python -m bench.<name>`` runs

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.data.prompts import answer_strings
from pyro_llm.models import AnswerTokenHead, BayesianLoRAModel, answer_token_ids, load_causal_lm

#: A Llama-3.2-1B-shaped config for random-init speed benchmarks on a GPU (no weights needed).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                        warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of every call of each function, timed in alternation: round ``i`` calls each function
    once, in an order shuffled per round (seeded), and its times are the ``i``-th entries of the
    lists. Shuffling keeps a fixed neighbour (one step always running right after another, in its
    wake of caches and allocator state) from biasing a ratio."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            sync(device)
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list of timings."""
    return {k: statistics.median(v) for k, v in samples.items()}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation."""
    return medians(interleaved_samples(fns, repeats, device, warmup))


def paired_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """``num``'s time over ``den``'s time in each round: a drift of the machine between rounds (other
    tenants of a shared CPU) cancels in each ratio."""
    return [a / b for a, b in zip(times[num], times[den])]


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics ``(k, n + 1 - k)``
    with ``k`` the largest index such that ``Binomial(n, 1/2)`` puts at most ``(1 - level) / 2``
    below ``k`` (the interval covers the median with probability at least ``level``, whatever the
    distribution of the timings' noise)."""
    from scipy.stats import binom

    xs, n = sorted(values), len(values)
    k = 0  # ends as the largest k with P(X <= k - 1) <= (1 - level) / 2
    while binom.cdf(k, n, 0.5) <= (1 - level) / 2:
        k += 1
    if k == 0:  # too few values for this level: the range is the widest interval there is
        return xs[0], xs[-1]
    return xs[k - 1], xs[n - k]


def ratio_summary(times: dict[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """The per-round ratios (:func:`paired_ratios`, kept to pool runs), their median, their
    quartiles (the spread of one round) and a distribution-free 95 % confidence interval of the
    median (:func:`median_ci`)."""
    ratios = paired_ratios(times, num, den)
    return {"median": statistics.median(ratios), "quartiles": statistics.quantiles(ratios, n=4),
            "median_ci95": list(median_ci(ratios)), "rounds": len(ratios), "ratios": ratios}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes allocated on the GPU during ``fn`` (CUDA), or the process's peak RSS after it (CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device))
    fn()
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes the CPU allocator held during ``fn`` above what it held when ``fn`` started (from
    the memory events of torch's profiler): a step's activations, gradients and transients, exact
    and free of the process's loading history, which the resident-memory peak is not."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not memory:
        return 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def plain_lora_step(model: BayesianLoRAModel, head: Any, batch: dict[str, torch.Tensor], *, lr: float = 1e-4,
                    fused: bool = True) -> Callable[[], None]:
    """A plain peft LoRA training step on ``model``'s modules, as the baseline of BLoB's: ``A`` (the
    sites) and ``B`` trainable, cross-entropy on the answer logits, AdamW (fused, as the Trainer of
    transformers uses by default with torch >= 2.8, and as SVITrainer does). Outside any Pyro
    handler a site module's product is a plain ``F.linear``, as peft's ``nn.Linear``. Call it after
    the BLoB trainer's first step, which creates ``B``'s parameters."""
    params = [s.module.weight for s in model.sites] + list(model.params.values())
    opt = torch.optim.AdamW(params, lr=lr, fused=fused)

    def step() -> None:
        for s in model.sites:
            s.module.weight.requires_grad_(True)
        logits = head(model.peft_model, batch["input_ids"], batch["attention_mask"]).float()
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for s in model.sites:
            s.module.weight.requires_grad_(False)

    return step


def load_base(model: str, device: torch.device, dtype: str):
    """The real embedded/hub model, or ``llama-1b``: a random-init Llama-1B config with the SmolLM2 tokenizer."""
    if model == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        _, tok = load_causal_lm("smollm2-135m", device="cpu")
        cfg = LlamaConfig(**{**LLAMA_1B, "vocab_size": max(LLAMA_1B["vocab_size"], len(tok))})
        torch.manual_seed(0)
        with torch.device(device):
            base = LlamaForCausalLM(cfg).to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
        base.eval()
        return base, tok
    return load_causal_lm(model, device=device, dtype=dtype)


def arc_batches(tok, n: int, max_length: int = 256):
    task = get_task("arc-easy")
    return task, encode_examples(load_examples(task, "train", limit=n), tok, task.num_classes, max_length)


def answer_head(tok, task) -> AnswerTokenHead:
    return AnswerTokenHead(answer_token_ids(tok, answer_strings(task.num_classes)))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def bench_parser(doc: str, memory_variants: list[str], examples: int = 8, repeats: int = 5):
    """The options every benchmark shares (``--memory-of`` runs one variant alone, for per-process
    peak memory on the CPU)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="an embedded/local/hub model, or llama-1b (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--examples", type=int, default=examples)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--memory-of", choices=memory_variants, default=None, help=argparse.SUPPRESS)
    return ap


def child_output(argv: list[str], tag: str) -> str:
    """Run ``python -m <argv>`` from the project root (a benchmark measuring one variant in a
    process of its own, where peak memory starts from nothing) and return what follows ``tag`` on
    the first line of its standard output that starts with it."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return next(line for line in out.splitlines() if line.startswith(tag + " "))[len(tag) + 1:]


def subprocess_peak(module: str, variant: str) -> float:
    """Peak memory of ``variant`` measured by re-running the benchmark ``module`` (``bench.bench_blob``)
    alone with ``--memory-of``."""
    argv = list(sys.argv[1:])
    if "--out" in argv:
        i = argv.index("--out")
        del argv[i:i + 2]
    return float(child_output([module, *argv, "--memory-of", variant], "PEAK").split()[0])


def fwd_bwd_floor(model: BayesianLoRAModel, data, batch_size: int, device: torch.device) -> None:
    """One forward and one backward pass per batch at the model's point values: what any K-FAC
    fit has to pay."""
    values = model.point_values()
    for idx in data.sequential(batch_size):
        b = data.batch(idx, device)
        logits = model.logits_at(b, {k: v.detach().requires_grad_(True) for k, v in values.items()})
        torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum").backward()


def report(name: str, result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


__all__ = ["BayesianLoRAModel", "LLAMA_1B", "allocator_peak", "answer_head", "arc_batches", "bench_parser", "child_output", "describe",
           "fwd_bwd_floor", "interleaved", "interleaved_samples", "load_base", "plain_lora_step", "medians",
           "median_ci", "paired_ratios", "peak_memory", "ratio_summary", "report", "subprocess_peak", "sync"]
