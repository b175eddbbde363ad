"""The training-free scale search: ``q(A) = N(A*, s^2)`` around a trained adapter with ``s`` chosen by
validation NLL. Its guide's means are exactly the trained ``A``, its ``sigma`` the chosen ``s``
everywhere; each grid point's NLL equals a hand-built guide's at that scale with the same draws;
and the choice is the grid's minimum."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDelta

from pyro_llm.evaluation import compute_metrics, predict_proba
from pyro_llm.guides import BLoBGuide, write_back_means
from pyro_llm.infer import OptimConfig, SVITrainer, search_scale


def test_scale_search_around_a_trained_adapter(arc_model):
    model, data = arc_model
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    SVITrainer(model, guide, OptimConfig(steps=6, batch_size=4, lr=5e-2, warmup_ratio=0.0),
               use_flipout=False, progress=False).fit(data)
    write_back_means(model, guide, data.batch(torch.arange(2)))
    trained = {s.name: s.module.weight.detach().clone() for s in model.sites}
    assert all(b.abs().max() > 0 for b in model.params.values())  # B moved: A's noise reaches the output
    validation = data
    grid = [1e-3, 0.03, 10.0]
    found = search_scale(model, validation, grid, num_samples=3, seed=7, prefix="ss")
    assert set(found.validation_nll) == set(grid)
    assert found.scale == min(grid, key=found.validation_nll.__getitem__)
    for name, sigma in found.guide.scales().items():
        torch.testing.assert_close(sigma, torch.full_like(sigma, found.scale), rtol=1e-6, atol=0)
        torch.testing.assert_close(found.guide.params(name)[0], trained[name].float(), rtol=0, atol=0)
    # one grid point against a guide built by hand at that scale, with the same draws
    hand = BLoBGuide(model, prefix="hand")
    hand.flat_params()
    with torch.no_grad():
        pyro.param("hand.G").fill_(math.sqrt(0.03))
    pyro.set_rng_seed(7)
    probs = predict_proba(model, hand, validation, num_samples=3, progress=False)
    assert compute_metrics(probs, validation.labels).nll == pytest.approx(found.validation_nll[0.03], rel=1e-5)
    with pytest.raises(ValueError, match="grid"):
        search_scale(model, validation, [0.0])
