"""Flipout and the KL weight as Pyro effect handlers: Flipout's row marginals, signs, fusion of sites
that read one input, and gradient variance; the KL weight's scaling of the KL term."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from scipy import stats

from pyro_llm.guides import BLoBGuide
from pyro_llm.models import lora_product
from pyro_llm.poutine import FlipoutMessenger, flipout, flipout_product, kl_weight, rademacher


def _batch(data, n=4):
    return data.batch(torch.arange(n))


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
