"""MeanFieldELBO: the same loss and gradients as Pyro's TraceMeanField_ELBO, term for term."""

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch.distributions import Normal, kl_divergence

from pyro_llm.guides import BLoBGuide
from pyro_llm.infer.elbo import MeanFieldELBO, has_closed_form_kl
from pyro_llm.infer.normal_kl import iid_normal_kl_sum
from pyro_llm.poutine import flipout, kl_weight
from pyro_llm.priors import GaussianPrior, LaplacePrior, StudentTPrior, as_prior


def _loss_and_grads(elbo, model, guide, batch, seed: int, use_flipout: bool, weight: float = 1.0):
    pyro.set_rng_seed(seed)
    with flipout() if use_flipout else torch.enable_grad(), kl_weight(weight=weight):
        loss = elbo.differentiable_loss(model, guide, **batch)
    params = dict(pyro.get_param_store().named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(params, grads)}


class _AsELBO:
    def __init__(self, fn):
        self.differentiable_loss = fn


def _closed_form_reference(model, guide, *args, weight: float = 1.0, **kwargs):
    """``-log p(y | A) + w sum_s KL_s`` written out from a plain trace of the guide (the same draws
    as the ELBO's, same seed): ``KL_s`` is torch's closed form of ``KL(N(loc_s, scale_s) || prior_s)``
    where one exists, else the one-sample estimate ``log q(A_s) - log p(A_s)``."""
    from pyro import poutine

    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    obs = model_trace.nodes["obs"]
    loss = -obs["fn"].log_prob(obs["value"]).sum() * obs["scale"]  # the plate's N / batch
    for name in model.site_names:
        aux = guide_trace.nodes[name + "_unconstrained"]
        q = aux["fn"].base_dist
        p = model_trace.nodes[name]["fn"].base_dist
        if has_closed_form_kl(q, p):
            loss = loss + weight * kl_divergence(Normal(q.loc, q.scale), p).sum()
        else:
            loss = loss + weight * (q.log_prob(aux["value"]).sum() - p.log_prob(aux["value"]).sum())
    return loss


def test_iid_normal_kl_sum_equals_torch_kl_and_its_gradients():
    """The site-by-site KL against one i.i.d. Normal prior: value and gradients (also of a learnt
    prior loc and scale) equal torch's kl_divergence over the concatenation; gradcheck in float64."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (4,), (2, 2, 3)]
    locs = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    scales = [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.05).requires_grad_() for s in shapes]
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ours = iid_normal_kl_sum(locs, scales, mu, sigma)
    ref = kl_divergence(Normal(torch.cat([t.flatten() for t in locs]), torch.cat([t.flatten() for t in scales])),
                        Normal(mu, sigma)).sum()
    torch.testing.assert_close(ours, ref)
    inputs = [*locs, *scales, mu, sigma]
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.gradcheck(lambda *t: iid_normal_kl_sum(list(t[:3]), list(t[3:6]), t[6], t[7]),
                                    tuple(inputs))
    # a fixed prior given as numbers; a scale without gradient gets none
    fixed = iid_normal_kl_sum([locs[0]], [scales[0].detach()], 0.0, 0.2)
    (g_loc,) = torch.autograd.grad(fixed, [locs[0]])
    torch.testing.assert_close(g_loc, locs[0].detach() / 0.2 ** 2)
    with pytest.raises(ValueError, match="shape"):
        iid_normal_kl_sum([locs[0]], [scales[1]], 0.0, 1.0)


@pytest.mark.parametrize("prior", [GaussianPrior(0.2), LaplacePrior(0.2), StudentTPrior(3.0, 0.2)],
                         ids=["gaussian", "laplace", "student-t"])
@pytest.mark.parametrize("guide_kind", ["blob", "autonormal", "autodelta"])
def test_meanfield_elbo_equals_pyro(arc_model, prior, guide_kind):
    model, data = arc_model
    model.prior = prior
    guide = {"blob": lambda: BLoBGuide(model),
             "autonormal": lambda: AutoNormal(model, init_loc_fn=model.init_loc_fn()),
             "autodelta": lambda: AutoDelta(model, init_loc_fn=model.init_loc_fn())}[guide_kind]()
    batch = data.batch(torch.arange(4))
    guide(**batch)  # create the parameters
    use_flipout = guide_kind != "autodelta"
    if guide_kind == "autonormal" and not isinstance(prior, StudentTPrior):  # Normal-Gaussian, Normal-Laplace
        # ours takes AutoNormal's KL in closed form through its auxiliary Normal; Pyro samples it
        reference = _closed_form_reference
        use_flipout = False  # the reference replays plain draws
    else:
        reference = TraceMeanField_ELBO().differentiable_loss
    ours, g_ours = _loss_and_grads(MeanFieldELBO(), model, guide, batch, 3, use_flipout)
    ref, g_ref = _loss_and_grads(_AsELBO(reference), model, guide, batch, 3, use_flipout)
    torch.testing.assert_close(ours, ref)
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        if g_ref[n] is None:
            assert g_ours[n] is None
        else:
            torch.testing.assert_close(g_ours[n], g_ref[n], msg=n)


@pytest.mark.parametrize("guide_kind", ["blob", "autonormal"])
def test_fused_kl_with_mixed_priors_and_kl_weight(arc_model, guide_kind):
    """Sites with Gaussian priors of different scales (fused KL), a Student-t site (sampled KL) and
    a KL weight != 1 (a site scale the fused sum must carry): the loss and every gradient equal
    Pyro's."""
    model, data = arc_model
    names = model.site_names
    model.prior = as_prior({names[0]: StudentTPrior(3.0, 0.2), names[1]: GaussianPrior(0.05, loc=0.01),
                            r".*": GaussianPrior(0.2)})
    guide = BLoBGuide(model) if guide_kind == "blob" else AutoNormal(model, init_loc_fn=model.init_loc_fn())
    batch = data.batch(torch.arange(4))
    guide(**batch)
    if guide_kind == "blob":
        reference, use_flipout = TraceMeanField_ELBO().differentiable_loss, True
    else:  # the KL weight is the reference's explicit w; the handler must scale AutoNormal's auxiliary sites
        reference = lambda m, g, **b: _closed_form_reference(m, g, weight=0.37, **b)  # noqa: E731
        use_flipout = False
    ours, g_ours = _loss_and_grads(MeanFieldELBO(), model, guide, batch, 5, use_flipout, weight=0.37)
    ref, g_ref = _loss_and_grads(_AsELBO(reference), model, guide, batch, 5, use_flipout,
                                 weight=0.37 if guide_kind == "blob" else 1.0)
    torch.testing.assert_close(ours, ref)
    for n in g_ref:
        if g_ref[n] is not None:
            torch.testing.assert_close(g_ours[n], g_ref[n], msg=n)


def test_closed_form_detection():
    import pyro.distributions as dist

    q = dist.Normal(torch.zeros(3, 4), 1.0).to_event(2)
    assert has_closed_form_kl(q, dist.Normal(0.0, 0.2).expand([3, 4]).to_event(2))
    assert not has_closed_form_kl(q, dist.StudentT(3.0, 0.0, 0.2).expand([3, 4]).to_event(2))
    assert not has_closed_form_kl(q, dist.Normal(0.0, 0.2).expand([3, 4]).to_event(1))  # mismatched event dims


def test_loss_parts_add_up_and_reach_the_history(arc_model):
    """The trainer records the per-example NLL and KL of every step (the progress bar shows them):
    they add up to the loss, the KL equals the closed form of BLoB's Gaussian KL, and the NLL
    is the data term alone."""
    from pyro_llm.guides import BLoBGuide
    from pyro_llm.infer import OptimConfig, SVITrainer

    model, data = arc_model
    guide = BLoBGuide(model)
    trainer = SVITrainer(model, guide, OptimConfig(steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0), progress=False)
    history = trainer.fit(data)
    for h in history:
        assert h["nll"] > 0 and h["kl"] > 0
        assert abs(h["nll"] + h["kl"] - h["loss"]) <= 1e-5 * abs(h["loss"])
    M, G = (t.detach().double() for t in guide.flat_params())
    sigma, prior = G ** 2, 0.2
    kl = (torch.log(prior / sigma) + (sigma ** 2 + M ** 2) / (2 * prior ** 2) - 0.5).sum() / model.dataset_size
    trainer.step(data.batch(torch.arange(4)), 2)  # the parts of this step, at the parameters before its update
    assert abs(trainer.last_terms["kl"] - float(kl)) <= 1e-4 * float(kl)


def test_a_maps_second_term_is_named_the_prior_penalty_and_equals_it(arc_model):
    """A MAP's loss is NLL - log p(A) / N: recorded as ``neg_log_prior`` (not a KL), equal to the
    prior's log density at the trained point, and the progress bar names it so."""
    from pyro.infer.autoguide import AutoDelta

    from pyro_llm.guides import BLoBGuide
    from pyro_llm.infer import OptimConfig, SVITrainer
    from pyro_llm.infer.svi import progress_fields

    model, data = arc_model
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    trainer = SVITrainer(model, guide, OptimConfig(steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0), progress=False)
    history = trainer.fit(data)
    assert all("kl" not in h and "neg_log_prior" in h for h in history)
    values = {k: v.detach().double() for k, v in guide.median().items() if k in model.site_names}
    prior = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    expected = -sum(float(prior.log_prob(v).sum()) for v in values.values()) / model.dataset_size
    trainer.step(data.batch(torch.arange(4)), 2)
    assert abs(trainer.last_terms["kl"] - expected) <= 1e-4 * abs(expected)
    shown = progress_fields(history[-1])
    assert set(shown) == {"nll", "-log_prior"}

    pyro.clear_param_store()
    blob = SVITrainer(model, BLoBGuide(model), OptimConfig(steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0),
                      progress=False).fit(data)
    shown = progress_fields(blob[-1])
    assert set(shown) == {"nll", "kl", "kl_share", "sigma"} and shown["kl_share"].endswith("%")
    share = 100 * blob[-1]["kl"] / (blob[-1]["nll"] + blob[-1]["kl"])
    assert shown["kl_share"] == f"{share:.0f}%"
