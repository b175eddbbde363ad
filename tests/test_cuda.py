"""CUDA paths (skipped without a GPU): the same code on the device, bf16 base weights, and agreement
with the CPU in float32."""

import pyro
import pytest
import torch

from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.evaluation import predict_proba
from pyro_llm.evaluation.glm import glm_logit_moments
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.infer.laplace import fit_laplace
from pyro_llm.models import LoRAOptions, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(path, device, dtype="float32", b_site=False):
    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=16)
    model, tok = build_model(str(path), task, lora=LoRAOptions(rank=4), b_site=b_site, dataset_size=len(ex),
                             device=device, dtype=dtype)
    return model, encode_examples(ex, tok, task.num_classes, 64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blob_trains_and_predicts_on_cuda(tiny_llama, dtype):
    model, data = _model(tiny_llama, "cuda", dtype)
    assert model.device.type == "cuda"
    guide = BLoBGuide(model)
    hist = SVITrainer(model, guide, OptimConfig(steps=8, batch_size=4, lr=1e-2), progress=False).fit(data)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    store = pyro.get_param_store()
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in store.values())
    probs = predict_proba(model, guide, data, num_samples=4, progress=False)
    assert torch.allclose(probs.sum(1), torch.ones(len(data)), atol=1e-3)


def test_kfac_and_glm_agree_between_cpu_and_cuda(tiny_llama):
    out = {}
    for device in ("cpu", "cuda"):
        pyro.clear_param_store()
        model, data = _model(tiny_llama, device, b_site=True)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for s in model.sites:
                s.module.weight.copy_(0.3 * torch.randn(s.shape, generator=gen))
        factors = fit_kfac(model, data, KFACConfig(fisher="empirical", n_kfac=4), progress=False)
        fit = fit_laplace(model, data, KFACConfig(fisher="empirical", n_kfac=4), prior_precision=1.0, progress=False)
        mean, cov = glm_logit_moments(fit.guide, data, progress=False)
        out[device] = (factors, mean, cov, fit.log_marginal_likelihood)
    (fc, mc, cc, lc), (fg, mg, cg, lg) = out["cpu"], out["cuda"]
    for name in fc.factors:
        for a, b in zip(fc.factors[name], fg.factors[name]):
            torch.testing.assert_close(a.to_matrix().cpu(), b.to_matrix().cpu(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(mc, mg, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cc, cg, rtol=1e-3, atol=1e-6)
    assert abs(lc - lg) < 1e-3 * abs(lc)
