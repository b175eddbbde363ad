"""IVON as a guide: its update is the ``ivon-opt`` package's (driven step by step with the same
noise, compared in float64), and through the SVI trainer it trains every site's mean and sets every
scale from its Hessian estimate, with the prior as its weight decay and no KL in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.evaluation import predict_proba
from pyro_llm.guides import IVONGuide, IVONOptimizer, guide_median
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import build_model
from pyro_llm.priors import GaussianPrior

ivon = pytest.importorskip("ivon")


def _loss(theta, a, b):
    """A non-quadratic loss (its Hessian depends on where it is taken), as a mean over 'examples'."""
    return (0.5 * a * theta ** 2 + b * theta + 0.1 * theta ** 4).sum() / 7.0


@pytest.mark.parametrize("rescale_lr,clip", [(True, math.inf), (False, 1e-2)])
def test_ivon_update_equals_the_ivon_opt_package(rescale_lr, clip):
    torch.manual_seed(0)
    n = 40
    a, b = torch.rand(n, dtype=torch.float64) * 3, torch.randn(n, dtype=torch.float64)
    start = torch.randn(n, dtype=torch.float64)
    # hess_init exact in float32: the package adds it to its buffer as a float32 scalar
    options = dict(lr=0.05, ess=50.0, hess_init=0.25, weight_decay=0.02, beta1=0.9, beta2=0.8)

    reference = torch.nn.Parameter(start.clone())
    ref_opt = ivon.IVON([reference], clip_radius=clip, rescale_lr=rescale_lr, **options)

    loc = start.clone().requires_grad_(True)
    root = (1.0 / math.sqrt(options["ess"] * (options["hess_init"] + options["weight_decay"]))) ** 0.5
    root = torch.full((n,), root, dtype=torch.float64, requires_grad=True)
    ours = IVONOptimizer(loc, root, clip_radius=clip, rescale_lr=rescale_lr, **options)

    for step in range(6):
        torch.manual_seed(100 + step)
        with ref_opt.sampled_params(train=True):
            _loss(reference, a, b).backward()
        ref_opt.step()
        ref_opt.zero_grad()

        torch.manual_seed(100 + step)  # the same standard-normal draw, scaled by our sigma = G^2
        eps = torch.randn(n, dtype=torch.float64)
        _loss(loc + root.square() * eps, a, b).backward()
        ours.step()
        loc.grad = root.grad = None

        torch.testing.assert_close(loc.detach(), reference.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.hessian(), ref_opt.param_groups[0]["hess"], rtol=1e-10, atol=1e-12)
        sigma = 1.0 / (options["ess"] * (ours.hessian() + options["weight_decay"])).sqrt()
        torch.testing.assert_close(root.detach().square(), sigma, rtol=1e-12, atol=0)
    assert not torch.allclose(ours.hessian(), torch.full_like(loc, options["hess_init"]))  # h did move


@pytest.fixture(params=["llama", "bert"])
def family(request, tiny_llama, tiny_bert):
    path, task = (tiny_llama, "arc-easy") if request.param == "llama" else (tiny_bert, "sst2")
    spec = get_task(task)
    examples = load_examples(spec, "train", limit=16)
    model, tok = build_model(str(path), spec, dataset_size=len(examples), prior=GaussianPrior(0.1))
    return model, encode_examples(examples, tok, spec.num_classes, max_length=64)


def test_ivon_guide_trains_every_site_and_sets_every_scale_from_its_hessian(family):
    model, data = family
    guide = IVONGuide(model, ess=200.0, hess_init=0.01, beta2=0.5)
    batch = data.batch(torch.arange(4))
    guide(**batch)
    before = {k: v.clone() for k, v in guide_median(guide, batch).items()}
    scales_before = {k: v.clone() for k, v in guide.scales().items()}
    b_before = {k: p.detach().clone() for k, p in model.params.items()}
    delta = 1.0 / (200.0 * 0.1 ** 2)  # the prior's precision per effective example
    assert guide.weight_decay == pytest.approx(delta)
    torch.testing.assert_close(next(iter(scales_before.values())),
                               torch.full_like(next(iter(scales_before.values())), (200.0 * (0.01 + delta)) ** -0.5))

    trainer = SVITrainer(model, guide, OptimConfig(steps=3, batch_size=4, lr=0.5, warmup_ratio=0.0),
                         use_flipout=True, progress=False)
    history = trainer.fit(data)
    assert [h["kl_weight"] for h in history] == [0.0, 0.0, 0.0]
    assert trainer.last_terms.get("kl", 0.0) == 0.0  # the prior is IVON's weight decay, not a KL in the loss
    own, adamw = trainer.optimizers
    assert isinstance(own, IVONOptimizer) and isinstance(adamw, torch.optim.AdamW)
    M, G = guide.flat_params()
    assert [p for p in own.param_groups[0]["params"]] == [M, G]
    assert {id(p) for p in adamw.param_groups[0]["params"]} == {id(p) for p in model.params.values()}

    after, scales = guide_median(guide, batch), guide.scales()
    hess = dict(zip(model.site_names, own.hessian().split([s.shape.numel() for s in model.sites])))
    for name in model.site_names:
        assert not torch.allclose(after[name], before[name]), f"site {name} did not train"
        assert not torch.allclose(scales[name], scales_before[name]), f"the scale of {name} did not move"
        expected = (200.0 * (hess[name].view(scales[name].shape) + delta)).rsqrt()
        torch.testing.assert_close(scales[name], expected, rtol=1e-5, atol=0)
    for name, p in model.params.items():
        assert not torch.equal(p.detach(), b_before[name]), f"{name} did not train"
    probs = predict_proba(model, guide, data, num_samples=2, progress=False)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(data)))


def test_ivon_needs_a_gaussian_prior_and_an_effective_sample_size(tiny_llama):
    from pyro_llm.priors import LaplacePrior

    spec = get_task("arc-easy")
    model, _ = build_model(str(tiny_llama), spec, prior=LaplacePrior(0.1), dataset_size=8)
    with pytest.raises(ValueError, match="IVON.*Gaussian prior"):
        IVONGuide(model)
    model, tok = build_model(str(tiny_llama), spec)
    batch = encode_examples(load_examples(spec, "train", limit=2), tok, spec.num_classes, max_length=64).batch(
        torch.arange(2))
    guide = IVONGuide(model)
    guide(**batch)  # rebuilding a trained guide (its saved G replaces the start) needs no ess
    with pytest.raises(ValueError, match="effective sample size"):
        guide.make_optimizer(0.1)  # training one does
