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

The linearised predictive on ``--test-examples`` ARC-Easy test prompts: pyro-llm's
``glm_logit_moments`` (one batched backward per batch) against bayesian-lora's ``jacobian_mean``
(``jacrev`` through a ``functional_call`` of the peft model, as its example does) plus ``variance``;
time in alternation, and the rise in peak memory that each predictive causes after the factors are
fitted, each in its own process. Both logit distributions go through the same probit link at the
same prior precision (pyro-llm's marginal-likelihood optimum) for ECE and NLL. ``--adapter`` takes
a trained peft adapter (e.g. ``runs/real/map/adapter`` from docs/RESULTS.md), so that the
calibration figures are those of a fine-tuned model; without it a random adapter is used.
bayesian-lora is run with ``lr_threshold=100``, so that every factor pair is (full ``r x r``,
rank-10 large), the only shape its ``model_evidence`` and ``variance`` accept.

    python -m bench.bench_vs_bayesian_lora --adapter runs/real/map/adapter --out bench/results/vs_bayesian_lora_cpu_smollm2.json
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from bench.common import (BayesianLoRAModel, answer_head, arc_batches, bench_parser, describe, fwd_bwd_floor, interleaved,
                    load_base, peak_memory, report, subprocess_peak)
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.data import encode_examples, load_examples
from pyro_llm.evaluation import compute_metrics
from pyro_llm.evaluation.glm import glm_logit_moments, probit_probs
from pyro_llm.guides import LaplaceGuide
from pyro_llm.infer.laplace import blocks_from_factors, optimize_prior_precision


LR_THRESHOLD = 100  # below d = 192 (v_proj's B) and above r = 8: every pair is (r x r, d x n_kfac)


def left_padded(tok, task, split: str, n: int, batch_size: int) -> list:
    """bayesian-lora reads position -1: left-padded batches of the same prompts."""
    side, tok.padding_side = tok.padding_side, "left"
    texts = [e.text for e in load_examples(task, split, limit=n)]
    out = [tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
           for i in range(0, len(texts), batch_size)]
    tok.padding_side = side
    return out


def setup(args):
    device = torch.device(args.device)
    base, tok = load_base(args.model, device, args.dtype)
    task, data = arc_batches(tok, args.examples)
    if args.adapter:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    else:
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    head = answer_head(tok, task)
    left = left_padded(tok, task, "train", args.examples, args.batch_size)
    test = encode_examples(load_examples(task, "test", limit=args.test_examples), tok, task.num_classes, 256)
    test_left = left_padded(tok, task, "test", args.test_examples, args.predictive_batch_size)
    return device, peft, head, task, data, left, test, test_left


def theirs(peft, head, left, device):
    from bayesian_lora import calculate_kronecker_factors

    ids = head.token_ids.to(device)

    def forward_call(model, batch):
        # the same work as pyro-llm's head: the output layer on the last (left-padded) position only
        base = model.get_base_model()
        hidden = getattr(base, base.base_model_prefix)(input_ids=batch["input_ids"].to(device),
                                                       attention_mask=batch["attention_mask"].to(device))
        return base.get_output_embeddings()(hidden.last_hidden_state[:, -1])[:, ids].float()

    return calculate_kronecker_factors(peft, forward_call, left, n_kfac=10, lr_threshold=LR_THRESHOLD,
                                       target_module_keywords=["lora"])


def their_predictive(peft, head, factors, test_left, s2: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """bayesian-lora's linearised predictive: logit means and covariances of every test prompt."""
    from bayesian_lora.main import jacobian_mean, variance

    ids = head.token_ids.to(device)
    means, covs = [], []
    for batch in test_left:
        batch = batch.to(device)
        jac, mu = jacobian_mean(peft, batch, output_callback=lambda out: out.logits[:, -1, ids].float())
        var = variance(batch, jac, factors, torch.tensor(s2, dtype=torch.float64), len(ids), 8, 10, str(device))
        means.append(mu.detach().double())
        covs.append(var.detach().double())
    return torch.cat(means), torch.cat(covs)


def rss_rise(fn) -> float:
    """How far ``fn`` raises this process's peak RSS above its peak so far (CPU only)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = peak_memory(fn, torch.device("cpu"))
    return max(after - before, 0.0)


def main() -> None:
    ap = bench_parser(__doc__, ["ours", "theirs", "floor", "glm_ours", "glm_theirs"], examples=64, repeats=2)
    ap.add_argument("--adapter", default=None, help="a trained peft LoRA adapter (r 8 on q/v) instead of a random one")
    ap.add_argument("--test-examples", type=int, default=16)
    ap.add_argument("--predictive-batch-size", type=int, default=2,
                    help="prompts per predictive call, both libraries (bayesian-lora's jacrev predictive at batch 4 "
                         "on SmolLM2 ran this 24 GB machine out of memory; its variance() fails an assertion at batch 1)")
    args = ap.parse_args()
    device, peft, head, task, data, left, test, test_left = setup(args)
    # bayesian-lora hooks nn.Linear modules named *lora*: it gets an untouched copy of the same adapter
    # (not made in the per-process memory runs, where each process holds one model)
    peft_plain_forward = peft if args.memory_of else copy.deepcopy(peft)
    their_fit = lambda: theirs(peft_plain_forward, head, left, device)  # noqa: E731
    from bayesian_lora import cholesky_decompose_small_factors, model_evidence

    def their_posterior():
        return cholesky_decompose_small_factors(their_fit(), LR_THRESHOLD, str(device), torch.float32)

    def measure(fn) -> None:  # a predictive: the rise of the peak it causes; a fit: the peak
        glm = args.memory_of.startswith("glm_")
        print(f"PEAK {rss_rise(fn) if glm and device.type == 'cpu' else peak_memory(fn, device)}")

    if args.memory_of == "theirs":
        return measure(their_fit)
    if args.memory_of == "glm_theirs":
        factors = their_posterior()
        return measure(lambda: their_predictive(peft_plain_forward, head, factors, test_left, 1.0, device))
    model = BayesianLoRAModel(peft, head, b_site=True, dataset_size=len(data))
    ours = lambda: fit_kfac(model, data, KFACConfig(mode="reduce", batch_size=args.batch_size), progress=False)  # noqa: E731

    def floor() -> None:
        fwd_bwd_floor(model, data, args.batch_size, device)

    def our_posterior() -> tuple:
        factors = ours()
        return factors, LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)

    if args.memory_of in ("ours", "floor"):
        return measure(ours if args.memory_of == "ours" else floor)
    if args.memory_of == "glm_ours":
        guide = our_posterior()[1]
        return measure(lambda: glm_logit_moments(guide, test, batch_size=args.predictive_batch_size, progress=False))
    times = interleaved({"floor": floor, "ours": ours, "theirs": their_fit}, args.repeats, device, warmup=1)
    mem = {who: subprocess_peak(__spec__.name, who) for who in ("floor", "ours", "theirs")}

    # evidence at the same prior precision (lambda = 1, prior variance s2 = 1)
    (factors, guide), their_factors = our_posterior(), their_posterior()
    our_lml = float(guide.log_marginal_likelihood(factors.log_likelihood))
    their_lml = float(model_evidence(peft_plain_forward, torch.tensor(factors.log_likelihood), their_factors, 8, 10,
                                     torch.tensor(1.0)))
    # the linearised predictive of both posteriors at pyro-llm's marginal-likelihood prior precision
    lam = float(optimize_prior_precision(guide, "marglik", log_likelihood=factors.log_likelihood))
    preds = {"ours": lambda: glm_logit_moments(guide, test, batch_size=args.predictive_batch_size, progress=False),
             "theirs": lambda: their_predictive(peft_plain_forward, head, their_factors, test_left, 1.0 / lam, device)}
    glm_times = interleaved(preds, args.repeats, device, warmup=0)
    glm_mem = {who: subprocess_peak(__spec__.name, f"glm_{who}") for who in ("ours", "theirs")}
    mu, cov = preds["ours"]()
    their_mu, their_cov = preds["theirs"]()
    calib = {"map": compute_metrics(mu.softmax(-1), test.labels).as_dict(),
             "pyro_llm": compute_metrics(probit_probs(mu, cov[0]), test.labels).as_dict(),
             "bayesian_lora": compute_metrics(probit_probs(their_mu, their_cov), test.labels).as_dict()}
    report("vs_bayesian_lora", {
        "device": describe(device), "model": args.model, "examples": len(data), "batch_size": args.batch_size,
        "fit_seconds": times, "ours_over_fwd_bwd": times["ours"] / times["floor"],
        "theirs_over_fwd_bwd": times["theirs"] / times["floor"], "ours_over_theirs": times["ours"] / times["theirs"],
        "peak_memory_bytes": mem, "memory_ours_over_theirs": mem["ours"] / mem["theirs"],
        "log_evidence_at_lambda_1": {"pyro_llm": our_lml, "bayesian_lora": their_lml},
        "adapter": args.adapter or "random (B ~ N(0, 0.01))", "test_examples": len(test),
        "predictive_batch_size": args.predictive_batch_size,
        "glm_seconds": glm_times, "glm_ours_over_theirs": glm_times["ours"] / glm_times["theirs"],
        "glm_peak_rise_bytes": glm_mem,
        "glm_memory_ours_over_theirs": glm_mem["ours"] / max(glm_mem["theirs"], 1.0),
        "prior_precision": lam, "test_metrics_probit": calib,
        "note": "bayesian-lora: last position only, its own evidence formula, Fisher of the batch-mean loss; "
                "pyro-llm: all real tokens (reduce), algorithms.md's evidence; both predictives through the "
                "same probit link at pyro-llm's marginal-likelihood prior precision",
    }, args.out)


if __name__ == "__main__":
    main()
