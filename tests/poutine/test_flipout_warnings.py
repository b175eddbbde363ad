"""Flipout warns only when asked for, and names LoRA sites only (never a prior's hyper-parameters)."""

import re
import warnings

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta

from pyro_llm import HierarchicalGaussianPrior
from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import LoRAOptions, build_model
from pyro_llm.poutine import FlipoutNotApplied, flipout


def _setup(tiny_llama):
    spec = get_task("arc-easy")
    examples = load_examples(spec, "train", limit=8)
    model, tok = build_model(str(tiny_llama), spec, lora=LoRAOptions(rank=2), dataset_size=8,
                             prior=HierarchicalGaussianPrior(0.2))
    return model, encode_examples(examples, tok, spec.num_classes, max_length=64)


def _flipout_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, FlipoutNotApplied)]


@pytest.mark.parametrize("use_flipout, warned", [(None, False), (True, True), (False, False)])
def test_a_point_guide_warns_only_when_flipout_was_asked_for(tiny_llama, use_flipout, warned):
    model, data = _setup(tiny_llama)
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    trainer = SVITrainer(model, guide, OptimConfig(steps=2, batch_size=4, warmup_ratio=0.0),
                         use_flipout=use_flipout, progress=False)
    messages = _flipout_warnings(lambda: trainer.fit(data))
    assert bool(messages) == warned
    if warned:
        assert len(messages) == 1  # once per handler, not once per step
        assert f"to {len(model.sites)} LoRA site(s)" in messages[0] and "_tau" not in messages[0]


def test_the_handler_names_the_lora_sites_and_not_the_hyper_sites(tiny_llama):
    model, data = _setup(tiny_llama)
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    batch = data.batch(torch.arange(4))
    guide(**batch)
    assert model.hyper_site_names()  # the prior samples latent sites the handler also sees

    def step():
        with flipout():
            Trace_ELBO().differentiable_loss(model, guide, **batch)

    messages = _flipout_warnings(step)
    assert len(messages) == 1
    count = int(re.search(r"to (\d+) LoRA site", messages[0]).group(1))
    assert count == len(model.sites) and "_tau" not in messages[0]
    pyro.clear_param_store()
