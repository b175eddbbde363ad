"""BLoB: the guide, its closed-form KL, Flipout, KL weighting, swapping guides and priors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from scipy import stats
from torch.distributions import kl_divergence

from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import BlobKLReweighting, LinearKLAnnealing, OptimConfig, SVITrainer
from pyro_llm.models import lora_product
from pyro_llm.poutine import FlipoutMessenger, flipout, flipout_product, kl_weight, rademacher
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


def test_flipout_row_marginals_match_plain_sampling():
    """Each row's perturbation is N(0, sum_i x_i^2 sigma_ji^2) with and without Flipout."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    x[1] = x[0]  # two identical rows
    loc, sigma = torch.randn(3, 6), 0.5 * torch.rand(3, 6) + 0.1
    n = 20000
    E = torch.randn(n, 3, 6)
    plain = torch.einsum("rd,nod->nro", x, loc + sigma * E) - x @ loc.T
    flip = torch.stack([flipout_product(x, loc, sigma * E[i]) for i in range(n)]) - x @ loc.T
    var = (x[0] ** 2 * sigma ** 2).sum(1)
    for row in range(2):
        for j in range(3):
            z = flip[:, row, j] / var[j].sqrt()
            assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
            assert abs(plain[:, row, j].var() / var[j] - 1) < 0.05
    # identical rows share one perturbation without Flipout, and are decorrelated with it
    assert torch.corrcoef(plain[:, :, 0].T)[0, 1] > 0.999
    assert abs(torch.corrcoef(flip[:, :, 0].T)[0, 1]) < 0.05


@pytest.mark.parametrize("method", ["table", "randint"])  # the CPU's way and the GPU's, both run here
def test_rademacher_signs_are_fair_and_independent(method):
    torch.manual_seed(0)
    s = rademacher((50, 333), torch.empty(0), method)  # odd size: the unpacked bytes are cut to shape
    assert s.shape == (50, 333) and set(s.unique().tolist()) == {-1.0, 1.0}
    flat = s.reshape(-1)
    n = flat.numel()
    assert stats.binomtest(int((flat > 0).sum()), n).pvalue > 1e-3
    # neighbouring bits of one byte and of consecutive bytes are uncorrelated
    for lag in (1, 7, 8, 9):
        r = float((flat[:-lag] * flat[lag:]).mean())
        assert abs(r) < 4 / math.sqrt(n)


def test_shared_input_signs_keep_sites_independent():
    """Two sites fed the same tensor share s_in; their perturbations stay uncorrelated N(0, .)."""
    torch.manual_seed(1)
    x = torch.randn(1, 6)
    loc = torch.zeros(2, 6)
    sigma = torch.full((2, 6), 0.5)
    n = 20000
    pairs = torch.empty(n, 2)
    for i in range(n):
        x_flipped = x * rademacher(x.shape, x)
        pairs[i, 0] = flipout_product(x, loc, sigma * torch.randn(2, 6), x_flipped)[0, 0]
        pairs[i, 1] = flipout_product(x, loc, sigma * torch.randn(2, 6), x_flipped)[0, 0]
    var = float((x[0] ** 2 * 0.25).sum())
    assert abs(float(torch.corrcoef(pairs.T)[0, 1])) < 0.03
    for k in range(2):
        assert stats.kstest((pairs[:, k] / math.sqrt(var)).numpy(), "norm").pvalue > 1e-3


def test_flipout_perturbs_with_the_guides_own_draw():
    """The handler draws A = M + sigma * E for the guide and perturbs the product with that very
    sigma * E: with one input feature, |h - x M^T| = |x (A - M)^T| exactly in every row. A value
    replaced on the way (not the drawn tensor) is read back as A - M: the same result."""
    M, sigma = torch.randn(3, 1), torch.full((3, 1), 0.7)
    x = torch.full((6, 1), 2.0)

    def guide():
        return pyro.sample("w", dist.Normal(M, sigma).to_event(2))

    def model(copy):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, 1), 1.0).to_event(2))
        return lora_product(x, w.clone() if copy else w, name="w")

    out = {}
    for copy in (False, True):
        pyro.set_rng_seed(3)
        with flipout():
            tr = poutine.trace(guide).get_trace()
            out[copy] = (poutine.replay(model, trace=tr)(copy), tr.nodes["w"]["value"])
    h, A = out[False]
    torch.testing.assert_close((h - x @ M.T).abs(), (x @ (A - M).T).abs().expand(6, 3))
    assert len({tuple(r) for r in torch.sign(h - x @ M.T).tolist()}) > 1  # rows get their own signs
    torch.testing.assert_close(out[True][0], h)
    torch.testing.assert_close(out[True][1], A)


def test_flipout_fuses_sites_that_read_the_same_input():
    """A handler entered again computes the products of sites that read one input (q/v) in one
    pass: the later site gets a slice of a shared product, each still exact (one input feature:
    |h - x M^T| = |x (A - M)^T|, dh/dM = sum of x over rows), and a later site that now reads another
    input is computed on its own."""
    Ms = {"q": torch.randn(3, 1, requires_grad=True), "v": torch.randn(2, 1, requires_grad=True)}
    sigma = {"q": torch.full((3, 1), 0.7), "v": torch.full((2, 1), 0.4)}
    x = torch.full((5, 1), 2.0)

    def guide():
        return {k: pyro.sample(k, dist.Normal(Ms[k], sigma[k]).to_event(2)) for k in Ms}

    def model(x_v):
        w = {k: pyro.sample(k, dist.Normal(torch.zeros_like(Ms[k]), 1.0).to_event(2)) for k in Ms}
        return {"q": lora_product(x, w["q"], name="q"), "v": lora_product(x_v, w["v"], name="v")}

    handler = FlipoutMessenger()
    for attempt, (x_v, fused) in enumerate([(x, False), (x, True), (x.clone(), False)]):
        for M in Ms.values():
            M.grad = None
        with handler:
            tr = poutine.trace(guide).get_trace()
            h = poutine.replay(model, trace=tr)(x_v)
        shared = h["v"].untyped_storage().data_ptr() == h["q"].untyped_storage().data_ptr()
        assert shared == fused, attempt
        sum(o.sum() for o in h.values()).backward()
        for k, M in Ms.items():
            A = tr.nodes[k]["value"].detach()
            torch.testing.assert_close((h[k] - x @ M.T).detach().abs(), (x @ (A - M).T).detach().abs().expand_as(h[k]))
            torch.testing.assert_close(M.grad, torch.full_like(M, float(x.sum())))


def test_flipout_handler_intercepts_only_guided_normal_sites(arc_model):
    model, data = arc_model
    guide = BLoBGuide(model)
    batch = _batch(data)
    seen = []

    class Spy(pyro.poutine.messenger.Messenger):
        def _pyro_post_lora_product(self, msg):
            seen.append((msg["name"], msg["infer"].get("flipout", False)))

    with Spy(), flipout():
        Trace_ELBO().differentiable_loss(model, guide, **batch)
    assert {n for n, _ in seen} == set(model.site_names) and all(done for _, done in seen)
    seen.clear()
    with Spy():
        Trace_ELBO().differentiable_loss(model, guide, **batch)
    assert seen and not any(done for _, done in seen)
    x = torch.randn(2, 3)
    torch.testing.assert_close(lora_product(x, torch.eye(3)), x)


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


def test_flipout_lowers_gradient_variance(arc_model):
    """Flipout's estimate of dELBO/dM has lower variance than plain reparametrisation (the KL is
    analytic, so all the noise is the likelihood's)."""
    model, data = arc_model
    guide = BLoBGuide(model, eps=0.3)
    batch = data.batch(torch.arange(16))
    guide(**batch)
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.3)
    M = pyro.get_param_store()["blob.M"]

    def grads(use_flipout):
        out = []
        for i in range(40):
            pyro.set_rng_seed(i)
            M.grad = None
            if use_flipout:
                with flipout():
                    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, **batch)
            else:
                loss = TraceMeanField_ELBO().differentiable_loss(model, guide, **batch)
            loss.backward()
            out.append(M.grad.clone())
        return torch.stack(out).var(0).sum()

    assert grads(True) < grads(False)


def test_kl_weight_scales_the_kl_term(arc_model):
    model, data = arc_model
    guide = BLoBGuide(model)
    batch = _batch(data)
    guide(**batch)
    elbo = TraceMeanField_ELBO()
    pyro.set_rng_seed(1)
    full = elbo.differentiable_loss(model, guide, **batch)
    pyro.set_rng_seed(1)
    with kl_weight(weight=0.0, sites=model.site_names):
        nll = elbo.differentiable_loss(model, guide, **batch)
    pyro.set_rng_seed(1)
    with kl_weight(weight=0.5, sites=model.site_names):
        half = elbo.differentiable_loss(model, guide, **batch)
    torch.testing.assert_close(half, nll + 0.5 * (full - nll), rtol=1e-5, atol=1e-3)


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
