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
