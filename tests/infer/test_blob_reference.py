"""``--preset blob`` against the BLoB reference's update rule, re-derived here in plain torch.

The reference (Wang-ML-Lab/bayesian-peft, ``modelwrappers/blob.py``) steps AdamW on the mean NLL's
gradient of ``M`` and ``B``; then takes ``pi_i * KL`` at the *updated* ``M``, with
``pi_i = 2^i / (2^(M+1) - 1)``, ``i`` counting ``1..M`` from a counter that starts at 1, and
``M = int(100 N^(pi/gamma) / B)``; and steps SGD (lr ``kllr``) on every parameter with a gradient:
``M`` (the KL's alone) and ``G`` (its NLL gradient, left in place, plus the KL's). Both optimisers
follow transformers' linear warm-up from 0 and linear decay. The test drives the library's
preset on a tiny Llama (LoRA on q/v and its ``lm_head``), records the likelihood's gradient each
step reaches ``M``, ``G`` and ``B`` (the same batches and Flipout noise), replays the reference rule
on copies from those gradients, and compares ``M``, ``sigma`` and ``B`` after every step, and the
KL weight the run logged, with the reference's ``N pi_i``."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.models import build_model
from pyro_llm.runs import preset_config
from pyro_llm.infer import SVITrainer
from pyro_llm.runs.registry import ELBOS

STEPS, N, BATCH, GAMMA = 32, 16, 4, 100.0


def _reference_cycle(n: int, b: int, gamma: float) -> int:
    return int(100 * (n ** (math.pi / gamma)) / b)


def test_preset_follows_the_reference_update_rule(tiny_llama):
    cfg = preset_config("blob", task="arc-easy", model={"name": str(tiny_llama), "device": "cpu"},
                        objective={"blob_gamma": GAMMA}, optim={"steps": STEPS, "batch_size": BATCH, "seed": 3})
    task = get_task("arc-easy")
    examples = load_examples(task, "train", limit=N)
    model, tok = build_model(str(tiny_llama), task, lora=cfg.lora, prior=cfg.prior.build(), dataset_size=N, seed=3)
    assert any(name.endswith("lm_head.lora_A") for name in model.site_names)  # the class head is adapted
    data = encode_examples(examples, tok, task.num_classes, max_length=64)
    guide = cfg.guide.build(model)
    kl = cfg.objective.kl(N, BATCH, STEPS)
    trainer = SVITrainer(model, guide, cfg.optim, elbo=ELBOS[cfg.objective.elbo](), use_flipout=True,
                         kl_schedule=kl, progress=False)
    cycle = _reference_cycle(N, BATCH, GAMMA)
    assert cycle < STEPS  # a whole cycle, its heavy last steps included, lies within the run
    trainer._setup(data.batch(data.training_batch(0, BATCH, 3)))
    store = dict(pyro.get_param_store().named_parameters())
    M, G = store["blob.M"], store["blob.G"]
    Bs = [store[n] for n in trainer.param_names if ".lora_B." in n]
    assert Bs and len(trainer.param_names) == 2 + len(Bs)
    seen: dict[str, list[torch.Tensor]] = {"M": [], "G": [], **{f"B{k}": [] for k in range(len(Bs))}}
    M.register_hook(lambda g: seen["M"].append(g.detach().clone()))
    G.register_hook(lambda g: seen["G"].append(g.detach().clone()))
    for k, b in enumerate(Bs):
        b.register_hook(lambda g, k=k: seen[f"B{k}"].append(g.detach().clone()))

    # the reference, on copies, in float64 so that its own rounding does not count
    ref_M, ref_G = M.detach().double().clone().requires_grad_(), G.detach().double().clone().requires_grad_()
    ref_B = [b.detach().double().clone().requires_grad_() for b in Bs]
    adamw = torch.optim.AdamW([ref_M, *ref_B], lr=1e-4, eps=1e-6, weight_decay=0.0)
    sgd = torch.optim.SGD([ref_M, ref_G, *ref_B], lr=1e-2)
    warm = STEPS * 0.06

    def factor(s: int) -> float:
        return s / max(1, warm) if s < warm else max(0.0, (STEPS - s) / max(1, STEPS - warm))

    schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (adamw, sgd)]
    counter, beta = 1, 0.2
    for step in range(STEPS):
        for v in seen.values():
            v.clear()
        trainer.step(data.batch(data.training_batch(step, BATCH, 3)), step)
        # the likelihood's gradients first (one per B), the KL's second (M and G only)
        nll_M, kl_M = seen["M"]
        nll_G, kl_G = seen["G"]
        ref_M.grad = nll_M.double()
        for k, r in enumerate(ref_B):
            (nll_B,) = seen[f"B{k}"]  # the likelihood's alone: the KL does not reach B
            r.grad = nll_B.double()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        mid_M = ref_M.detach().clone()
        i = counter % cycle or cycle
        pi = 2.0 ** i / (2.0 ** (cycle + 1) - 1)
        counter += 1
        with torch.no_grad():
            sigma = ref_G ** 2
            kl_grad_G = pi * (-1 / sigma + sigma / beta ** 2) * 2 * ref_G  # d(pi KL)/dG, sigma = G^2
            ref_M.grad = pi * ref_M / beta ** 2  # d(pi KL)/dM at the updated M
            ref_G.grad = nll_G.double() + kl_grad_G
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        for sch in schedules:
            sch.step()
        # the KL's gradients the library took: the closed form at the means AdamW had just updated
        torch.testing.assert_close(kl_M.double(), pi * mid_M / beta ** 2, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(kl_G.double(), kl_grad_G, rtol=1e-5, atol=1e-9)
        assert trainer.kl_schedule(step) == pytest.approx(N * pi, rel=1e-9)
        torch.testing.assert_close(M.detach().double(), ref_M.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close((G.detach() ** 2).double(), (ref_G.detach() ** 2), rtol=1e-5, atol=1e-9)
        for b, r in zip(Bs, ref_B):
            torch.testing.assert_close(b.detach().double(), r.detach(), rtol=1e-5, atol=1e-7)
    # the KL's cycle moved sigma well away from its initial range, and every B moved from 0
    assert (G.detach() ** 2).mean() > 2 * 0.05 ** 2  # sigma_0 <= eps^2 = 0.0025
    assert all(b.abs().max() > 0 for b in Bs)


def test_cycle_lengths_are_the_reference_values_and_blob_cycles_fit_the_run():
    from pyro_llm.infer.schedules import blob_cycle_length
    from pyro_llm.runs import ObjectiveConfig

    # the values the reference prints ("M:") for these data sets and batch sizes
    assert [blob_cycle_length(n, b) for n, b in ((87, 8), (2251, 4), (1098, 4))] == \
        [_reference_cycle(87, 8, 8), _reference_cycle(2251, 4, 8), _reference_cycle(1098, 4, 8)] == [72, 518, 390]
    schedule = ObjectiveConfig(kl_schedule="blob-cycles", kl_cycles=4).kl(87, 8, steps=200)
    weights = [schedule(s) for s in range(200)]
    peaks = [s for s in range(200) if weights[s] == max(weights)]
    assert peaks == [49, 99, 149, 199]  # four whole cycles end within the 200 steps
    assert sum(weights) / 87 == pytest.approx(4.0, rel=1e-3)  # each cycle's pi_i sum to about one KL
