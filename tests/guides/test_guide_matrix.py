"""Every guide trains every site it claims, on a Llama-style causal LM (site names begin with
``base_model.model.model.``, where Pyro's ``AutoDelta`` once lost them) and on a BERT encoder:
after a few SVI steps every site's location and every ``B`` has moved, the guide holds the
parameters it should, and the trainer's scale optimiser holds exactly the scales the guide has."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import (AutoDelta, AutoGuideList, AutoLowRankMultivariateNormal, AutoNormal)

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.evaluation import predict_proba
from pyro_llm.guides import BLoBGuide, guide_median
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import build_model
from pyro_llm.poutine import FlipoutNotApplied


class HandWrittenGuide:
    """A researcher's guide: a Normal per site with one learnt log-scale per site, declared a scale."""

    def __init__(self, model, sites=None):
        self.model = model
        self.sites = [s for s in model.sites if sites is None or s.name in sites]

    def __call__(self, *args, **kwargs):
        for s in self.sites:
            loc = pyro.param(f"{s.name}.loc", lambda: s.module.weight.detach().clone())
            log_scale = pyro.param(f"{s.name}.log_scale", lambda: torch.tensor(-5.0))
            pyro.sample(s.name, dist.Normal(loc, log_scale.exp().expand(loc.shape)).to_event(2))

    def median(self, *args, **kwargs):
        return {s.name: pyro.param(f"{s.name}.loc").detach() for s in self.sites}

    def param_groups(self):
        return {"scale": [pyro.param(f"{s.name}.log_scale") for s in self.sites]}


def _mixed(model):
    """AutoDelta on the first half of the sites, AutoNormal on the rest."""
    names = model.site_names
    half = names[: len(names) // 2]
    guide = AutoGuideList(model)
    guide.append(AutoDelta(poutine.block(model, expose=half), init_loc_fn=model.init_loc_fn()))
    guide.append(AutoNormal(poutine.block(model, hide=half), init_loc_fn=model.init_loc_fn(), init_scale=0.01))
    return guide


def _mixed_custom(model):
    """AutoDelta on the first half of the sites, a researcher's guide on the rest (Pyro wraps it in an
    ``AutoCallable``: its declared scales and its median must still reach the trainer)."""
    names = model.site_names
    half = names[: len(names) // 2]
    guide = AutoGuideList(model)
    guide.append(AutoDelta(poutine.block(model, expose=half), init_loc_fn=model.init_loc_fn()))
    guide.append(HandWrittenGuide(model, sites=names[len(names) // 2:]))
    return guide


# name -> (factory, guide parameters per site or in all, scale tensors, Flipout applies to every site)
GUIDES = {
    "blob": (BLoBGuide, lambda n: 2, lambda n: 1, True),  # one flat M and one flat G for all sites
    "autodelta": (lambda m: AutoDelta(m, init_loc_fn=m.init_loc_fn()), lambda n: n, lambda n: 0, False),
    "autonormal": (lambda m: AutoNormal(m, init_loc_fn=m.init_loc_fn(), init_scale=0.01), lambda n: 2 * n,
                   lambda n: n, True),
    "lowrank": (lambda m: AutoLowRankMultivariateNormal(m, init_loc_fn=m.init_loc_fn(), init_scale=0.01, rank=2),
                lambda n: 3, lambda n: 2, False),
    "autoguidelist": (_mixed, lambda n: n // 2 + 2 * (n - n // 2), lambda n: n - n // 2, False),
    "handwritten": (HandWrittenGuide, lambda n: 2 * n, lambda n: n, True),
    "autoguidelist-custom": (_mixed_custom, lambda n: n // 2 + 2 * (n - n // 2), lambda n: n - n // 2, False),
}


@pytest.fixture(params=["llama", "bert"])
def family(request, tiny_llama, tiny_bert):
    path, task = (tiny_llama, "arc-easy") if request.param == "llama" else (tiny_bert, "sst2")
    spec = get_task(task)
    examples = load_examples(spec, "train", limit=16)
    model, tok = build_model(str(path), spec, dataset_size=len(examples))
    return model, encode_examples(examples, tok, spec.num_classes, max_length=64)


@pytest.mark.parametrize("kind", list(GUIDES))
def test_every_guide_trains_every_site(family, kind):
    model, data = family
    factory, n_params, n_scales, normal = GUIDES[kind]
    n = len(model.sites)
    assert model.site_names[0].startswith(("base_model.model.model.", "base_model.model.bert."))
    guide = factory(model)
    batch = data.batch(torch.arange(4))
    with poutine.block():
        guide(**batch)  # create the parameters
    before = {k: v.clone() for k, v in guide_median(guide, batch).items()}  # medians share storage
    b_before = {k: p.detach().clone() for k, p in model.params.items()}
    trainer = SVITrainer(model, guide, OptimConfig(steps=3, batch_size=4, lr=5e-2, g_lr=1e-2, warmup_ratio=0.0),
                         use_flipout=True, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(data)
    flipout_warnings = [w for w in caught if issubclass(w.category, FlipoutNotApplied)]
    assert bool(flipout_warnings) != normal  # Flipout either applies to every site or says which it skips
    after = guide_median(guide, batch)
    assert set(after) >= set(model.site_names)
    for name in model.site_names:  # every site's location moved
        assert not torch.allclose(after[name], before[name]), f"{kind}: site {name} did not train"
    for name, p in model.params.items():  # and every B
        assert not torch.equal(p.detach(), b_before[name]), f"{kind}: {name} did not train"
    guide_params = [k for k in trainer.param_names if k not in model.params]
    assert len(guide_params) == n_params(n), guide_params
    scale_opt = trainer.optimizers[1].param_groups[0]["params"] if len(trainer.optimizers) > 1 else []
    assert len(scale_opt) == n_scales(n)
    probs = predict_proba(model, guide, data, num_samples=2, progress=False)  # the N-sample predictive works
    torch.testing.assert_close(probs.sum(1), torch.ones(len(data)))


def test_map_guide_of_the_registry_trains_a_and_b(tiny_llama):
    """``--guide map`` (the registry's AutoDelta) holds one parameter per A site and trains it."""
    from pyro_llm.runs import GUIDES as REGISTRY, make_guide

    spec = get_task("arc-easy")
    examples = load_examples(spec, "train", limit=8)
    model, tok = build_model(str(tiny_llama), spec, dataset_size=len(examples))
    guide = make_guide("map", model)
    data = encode_examples(examples, tok, spec.num_classes, max_length=64)
    guide(**data.batch(torch.arange(2)))
    assert len(list(guide.parameters())) == len(model.sites)
    assert not REGISTRY["map"].flipout and REGISTRY["blob"].flipout and REGISTRY["normal"].flipout


def test_a_prefix_that_is_a_guide_attribute_is_refused():
    from pyro_llm.models.lora import check_site_name

    check_site_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
    with pytest.raises(ValueError, match="attribute of Pyro's autoguides"):
        check_site_name("model.layers.0.self_attn.q_proj.lora_A")
