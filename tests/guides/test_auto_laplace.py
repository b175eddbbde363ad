"""Pyro's own ``AutoLaplaceApproximation`` over the LoRA sites: it needs a Hessian (double
backward through attention), which the eager attention kernel allows on the CPU."""

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.models import LoRAOptions, build_model


def test_auto_laplace_approximation_with_eager_attention(tiny_llama):
    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=8)
    model, tok = build_model(str(tiny_llama), task, lora=LoRAOptions(rank=1), dataset_size=len(ex),
                             attn_implementation="eager")
    batch = encode_examples(ex, tok, task.num_classes, 64).batch(torch.arange(8))
    guide = AutoLaplaceApproximation(model, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(**batch)
    posterior = guide.laplace_approximation(**batch)
    dim = sum(s.shape.numel() for s in model.sites)
    cov = posterior.get_posterior().covariance_matrix
    assert cov.shape == (dim, dim)
    assert bool(torch.isfinite(cov).all()) and float(torch.linalg.eigvalsh(cov.double()).min()) > 0
    # the Hessian saw the data: the posterior is tighter than the N(0, 0.2^2) prior in some direction
    assert float(torch.linalg.eigvalsh(cov.double()).min()) < 0.2 ** 2
    draws = torch.stack([posterior()[model.site_names[0]] for _ in range(4)])
    assert float(draws.std(0).min()) > 0  # every entry of the site varies across draws


def test_auto_laplace_approximation_gives_its_map_to_fit_laplace_and_the_mean_predictive(tiny_llama):
    """Pyro's ``median`` is not implemented for it; the library reads the MAP it trains instead."""
    from pyro_llm.evaluation import predict_proba
    from pyro_llm.guides import guide_median
    from pyro_llm.infer import fit_laplace

    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=8)
    model, tok = build_model(str(tiny_llama), task, lora=LoRAOptions(rank=1), dataset_size=len(ex),
                             attn_implementation="eager")
    data = encode_examples(ex, tok, task.num_classes, 64)
    batch = data.batch(torch.arange(8))
    guide = AutoLaplaceApproximation(model, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(**batch)
    point = guide_median(guide, batch)
    assert sorted(point) == sorted(model.site_names)
    flat = torch.cat([point[site["name"]].reshape(-1) for site, _ in guide._unpack_latent(guide.loc)])
    torch.testing.assert_close(flat, guide.loc.detach(), rtol=0, atol=0)  # the trained latent, site by site
    init = {s.name: s.module.weight.detach().clone() for s in model.sites}
    fit = fit_laplace(model, data, guide=guide, prior_precision=1.0, progress=False, a_only=True)
    for s in model.sites:  # the MAP was written into the modules, and it moved from the initialisation
        torch.testing.assert_close(s.module.weight.detach(), point[s.name], rtol=0, atol=0)
    assert any(not torch.equal(init[n], point[n]) for n in init)
    assert set(fit.guide.blocks) == set(model.site_names)
    probs = predict_proba(model, guide, data, num_samples=0, progress=False)
    assert probs.shape == (8, task.num_classes) and bool(torch.isfinite(probs).all())
