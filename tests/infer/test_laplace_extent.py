"""``fit_laplace``'s posterior covers the model's sites; ``a_only`` states which extent is meant."""

import warnings

import pytest
import torch

from pyro_llm.curvature import KFACConfig
from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.infer import fit_laplace
from pyro_llm.models import LoRAOptions, build_model


def _fitted_model(tiny_llama, b_site):
    spec = get_task("arc-easy")
    examples = load_examples(spec, "train", limit=8)
    model, tok = build_model(str(tiny_llama), spec, lora=LoRAOptions(rank=2), b_site=b_site, dataset_size=8)
    with torch.no_grad():
        for p in list(model.params.values()) + [s.module.weight for s in model.sites]:
            p.normal_(0, 0.3)
    return model, encode_examples(examples, tok, spec.num_classes, max_length=64)


def _fit(model, data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_laplace(model, data, KFACConfig(n_kfac=2), prior_precision=4.0, progress=False, **kw)
    return fit, [str(w.message) for w in caught if "posterior over A only" in str(w.message)]


def test_a_and_b_model_fits_both_silently_and_refuses_a_only(tiny_llama):
    model, data = _fitted_model(tiny_llama, b_site=True)
    fit, warned = _fit(model, data)
    assert not warned and {n.rsplit(".", 1)[-1] for n in fit.guide.blocks} >= {"lora_A", "lora_B"}
    with pytest.raises(ValueError, match="b_site=False"):
        fit_laplace(model, data, KFACConfig(n_kfac=2), prior_precision=4.0, progress=False, a_only=True)


def test_an_a_only_model_warns_unless_a_only_is_stated(tiny_llama):
    model, data = _fitted_model(tiny_llama, b_site=False)
    fit, warned = _fit(model, data)
    assert len(warned) == 1 and all(n.endswith("lora_A") for n in fit.guide.blocks)
    _, warned = _fit(model, data, a_only=True)
    assert not warned
    with pytest.raises(ValueError, match="b_site=True"):
        fit_laplace(model, data, KFACConfig(n_kfac=2), prior_precision=4.0, progress=False, a_only=False)
