"""BLoB: the guide, its closed-form KL, Flipout, KL weighting, swapping guides and priors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import BlobKLReweighting, LinearKLAnnealing, OptimConfig, SVITrainer
from pyro_llm.poutine import flipout
from pyro_llm.priors import LaplacePrior, StudentTPrior


def _batch(data, n=4):
    return data.batch(torch.arange(n))


def test_guide_initialisation_matches_blob(arc_model):
    model, data = arc_model
    guide = BLoBGuide(model)
    guide(**_batch(data))
    for s in model.sites:
        M, G = guide.params(s.name)
        torch.testing.assert_close(M, s.module.weight)  # LoRA's Kaiming init
        assert G.min() >= 0.05 / math.sqrt(2) and G.max() <= 0.05
        sigma = guide.sigma(G)
        assert sigma.min() >= 0.00125 - 1e-9 and sigma.max() <= 0.0025 + 1e-9
    soft = BLoBGuide(model, sigma_param="softplus")
    pyro.clear_param_store()
    soft(**_batch(data))
    s0 = soft.sigma(soft.params(model.site_names[0])[1])
    assert s0.min() >= 0.00125 - 1e-6 and s0.max() <= 0.0025 + 1e-6


def test_meanfield_elbo_uses_the_closed_form_kl(arc_model):
    """-ELBO = -E_q[log p(y|A)] + sum KL(q||p); with a fixed draw the NLL part is shared."""
    model, data = arc_model
    guide = BLoBGuide(model)
    batch = _batch(data)
    guide(**batch)
    pyro.set_rng_seed(5)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, **batch)
    pyro.set_rng_seed(5)
    gtr = poutine.trace(guide).get_trace(**batch)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(**batch)
    mtr.compute_log_prob()
    nll = -mtr.nodes["obs"]["log_prob_sum"]
    kl = 0.0
    for s in model.sites:
        M, G = guide.params(s.name)
        q = torch.distributions.Normal(M, G ** 2)
        p = torch.distributions.Normal(torch.zeros_like(M), 0.2 * torch.ones_like(M))
        kl = kl + kl_divergence(q, p).sum()
        # the closed form itself
        closed = (torch.log(0.2 / G ** 2) + (G ** 4 + M ** 2) / (2 * 0.04) - 0.5).sum()
        torch.testing.assert_close(kl_divergence(q, p).sum(), closed, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(loss, nll + kl, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("prior,analytic", [(LaplacePrior(0.1), True), (StudentTPrior(3.0, 0.1), False)])
def test_kl_is_analytic_where_torch_has_it_and_sampled_otherwise(arc_model, prior, analytic):
    model, data = arc_model
    model.prior = prior
    guide = BLoBGuide(model)
    batch = _batch(data)
    q = dist.Normal(torch.zeros(2), torch.ones(2))
    try:
        kl_divergence(q, prior.prior_dist("x", model.sites[0].layer, torch.Size([2])).base_dist)
        has_closed_form = True
    except NotImplementedError:
        has_closed_form = False
    assert has_closed_form == analytic
    # B = 0: the likelihood ignores A, so only a sampled KL makes two loss evaluations differ
    losses = [TraceMeanField_ELBO().differentiable_loss(model, guide, **batch).item() for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert (losses[0] == losses[1]) == analytic
    trainer = SVITrainer(model, guide, OptimConfig(steps=5, batch_size=4, lr=1e-2), progress=False)
    hist = trainer.fit(data)
    assert all(math.isfinite(h["loss"]) for h in hist)


def test_gradients_reach_M_G_and_B(arc_model):
    model, data = arc_model
    guide = BLoBGuide(model)
    batch = _batch(data)
    guide(**batch)
    with torch.no_grad():  # B = 0 blocks the gradient to A: move B off zero as after a few steps
        for p in model.params.values():
            p.normal_(0, 0.1)
    with flipout():
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide, **batch)
    loss.backward()
    store = pyro.get_param_store()
    sizes = [s.shape.numel() for s in model.sites]
    for suffix in ("M", "G"):  # every site's piece of the flat parameters gets a gradient
        for s, g in zip(model.sites, store[f"blob.{suffix}"].grad.split(sizes)):
            assert g.abs().sum() > 0, f"{s.name}.{suffix}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.params.values())


def test_kl_schedules():
    blob = BlobKLReweighting(dataset_size=400, batches_per_epoch=100)
    pis = [blob(i) / 400 for i in range(100)]
    assert sum(pis) == pytest.approx(1.0, rel=1e-6) and pis[-1] > pis[0]
    assert blob(100) == blob(0)
    lin = LinearKLAnnealing(10, 0.0, 1.0)
    assert lin(0) == 0 and lin(5) == 0.5 and lin(50) == 1.0


def test_batched_samples_equal_sequential_samples(arc_model):
    from pyro_llm.evaluation import predict_proba

    model, data = arc_model
    guide = BLoBGuide(model, eps=0.3)
    guide(**_batch(data))
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.3)
    pyro.set_rng_seed(7)
    batched = predict_proba(model, guide, data, num_samples=6, batch_size=4, max_rows=64, progress=False)
    pyro.set_rng_seed(7)
    looped = predict_proba(model, guide, data, num_samples=6, batch_size=4, max_rows=4, progress=False)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-4)
    mean = predict_proba(model, guide, data, num_samples=0, progress=False)
    assert not torch.allclose(mean, batched)


def test_runs_saved_with_per_site_parameters_still_load(arc_model, tmp_path):
    """guide.safetensors of BLoB runs from before the flat layout (``<site>.M``, ``<site>.G``) loads
    into the flat parameters, every site's piece in its place."""
    from pyro_llm.infer import load_params
    from pyro_llm.io import atomic_save_tensors

    model, data = arc_model
    guide = BLoBGuide(model)
    guide(**_batch(data))
    gen = torch.Generator().manual_seed(0)
    old = {}
    for s in model.sites:
        old[f"{s.name}.M"] = torch.randn(s.shape, generator=gen)
        old[f"{s.name}.G"] = torch.rand(s.shape, generator=gen)
    atomic_save_tensors(tmp_path / "guide.safetensors", old)
    load_params(tmp_path / "guide.safetensors", upgrade=guide.upgrade_saved)
    for s in model.sites:
        M, G = guide.params(s.name)
        assert torch.equal(M, old[f"{s.name}.M"]) and torch.equal(G, old[f"{s.name}.G"])
