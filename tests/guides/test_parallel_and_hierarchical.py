"""``Predictive(parallel=True)`` draws what the sequential ``Predictive`` draws (BLoB and Laplace
guides), and hierarchical priors (a sampled prior scale) train under BLoB with an unbiased ELBO."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_llm.curvature import KFACConfig
from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import MeanFieldELBO, OptimConfig, SVITrainer, fit_laplace
from pyro_llm.models import LoRAOptions, build_model


def _model(tiny_llama, b_site=False, n=8):
    spec = get_task("arc-easy")
    examples = load_examples(spec, "train", limit=n)
    model, tok = build_model(str(tiny_llama), spec, lora=LoRAOptions(rank=2), b_site=b_site, dataset_size=n)
    return model, encode_examples(examples, tok, spec.num_classes, max_length=64)


def _blob(model, data):
    guide = BLoBGuide(model)
    guide(**data.batch(torch.arange(2)))
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.5)  # B != 0, so A's noise reaches the logits
        pyro.param("blob.G").fill_(0.5)  # sigma = 0.25 at every site
    return guide


def _laplace(model, data):
    with torch.no_grad():
        for s in model.sites:
            s.module.weight.normal_(0, 0.3)
    return fit_laplace(model, data, KFACConfig(n_kfac=2), prior_precision=4.0, progress=False).guide


@pytest.mark.parametrize("kind", ["blob", "laplace"])
def test_parallel_predictive_equals_sequential(tiny_llama, kind):
    model, data = _model(tiny_llama, b_site=kind == "laplace")
    guide = _blob(model, data) if kind == "blob" else _laplace(model, data)
    batch = data.batch(torch.arange(3))
    batch.pop("labels")
    S = 64
    out = {}
    for parallel in (False, True):
        pyro.set_rng_seed(1)
        out[parallel] = Predictive(model, guide=guide, num_samples=S, parallel=parallel,
                                   return_sites=["logits"])(**batch)["logits"].reshape(S, 3, -1)
    offered = batch["choice_mask"]
    for logits in out.values():
        assert (logits.std(0)[offered] > 1e-3).all()  # the sample dimension really varies
    p_seq, p_par = (out[k].softmax(-1) for k in (False, True))
    # two independent Monte Carlo estimates of one expectation: agree within their standard errors
    se = ((p_seq.var(0) + p_par.var(0)) / S).sqrt()
    assert ((p_seq.mean(0) - p_par.mean(0)).abs() <= 5 * se + 1e-6).all()
    s_seq, s_par = out[False].std(0), out[True].std(0)
    assert ((s_par / s_seq - 1).abs()[offered] < 0.5).all()  # same spread (S = 64: the ratio's sd is ~0.09)


class HalfCauchyScale:
    """A hierarchical prior: each site's entries ~ N(0, tau_site^2), tau_site ~ HalfCauchy(0.2)."""

    def __init__(self, sep: str = "_"):
        self.sep = sep

    def prior_dist(self, name, module, shape):
        tau = pyro.sample(f"{name}{self.sep}tau", dist.HalfCauchy(torch.tensor(0.2)))
        return dist.Normal(torch.tensor(0.0), tau).expand(shape).to_event(len(shape))


def test_hierarchical_prior_trains_under_blob(tiny_llama):
    model, data = _model(tiny_llama, n=16)
    model.prior = HalfCauchyScale()
    guide = BLoBGuide(model)
    assert model.hyper_site_names() == [f"{s}_tau" for s in model.site_names]
    trainer = SVITrainer(model, guide, OptimConfig(steps=3, batch_size=4, lr=5e-2, warmup_ratio=0.0),
                         progress=False)
    hyper_before = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    trainer.fit(data)
    store = dict(pyro.get_param_store().named_parameters())
    hyper = [k for k in store if k.startswith("AutoNormal.")]
    assert len(hyper) == 2 * len(model.sites)  # a location and a scale per tau
    assert all(not torch.equal(store[k], hyper_before.get(k, store[k] + 1)) for k in hyper)
    # the hyper-guide's scales are scales for the optimiser too
    assert len(trainer.optimizers[1].param_groups[0]["params"]) == 1 + len(model.sites)  # blob.G + a tau scale each


def test_a_hyper_site_nested_under_a_site_is_refused(tiny_llama):
    model, _ = _model(tiny_llama)
    model.prior = HalfCauchyScale(sep=".")
    with pytest.raises(ValueError, match="nested under LoRA site"):
        model.hyper_site_names()


def test_meanfield_elbo_keeps_the_log_jacobian_of_positive_sites():
    """AutoNormal on a positive site puts a Delta with the log-Jacobian there; the ELBO must count it:
    equal to Trace_ELBO draw for draw (same seed), where Pyro's KL(Delta || p) would drop it."""

    def model(y):
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(1.0)))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(0.0, tau), obs=y)

    y = torch.tensor([0.3, -1.2, 2.0, 0.1])
    guide = AutoNormal(model)
    guide(y)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        ours = MeanFieldELBO().differentiable_loss(model, guide, y)
        pyro.set_rng_seed(seed)
        ref = Trace_ELBO().differentiable_loss(model, guide, y)
        torch.testing.assert_close(ours, ref)
