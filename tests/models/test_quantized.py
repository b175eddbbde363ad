"""A quantized base model (bitsandbytes int8 / NF4, run on the CPU): logits within the quantization's
error of the float model, every guide trains every site on it, K-FAC on a quantized layer equals its
exact per-example Fisher, runs record their quantization and reload with it, the adapter loads in
plain peft, and the quantized layers hold a fraction of their float32 bytes."""

import json

import pyro
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import bitsandbytes as bnb  # a test dependency; the library needs it only for --quantize
from linear_models import LinearHead, _grad_outer
from pyro_llm.curvature import KFACConfig, fit_kfac
from pyro_llm.data import EncodedDataset, encode_examples, get_task, load_examples
from pyro_llm.guides import guide_median
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import BayesianLoRAModel, build_model
from pyro_llm.models.quantize import check_quantize, quantized_linear_bytes
from pyro_llm.runs import SVIConfig, evaluate, make_guide, train

KINDS = ["int8", "nf4"]


def _arc(tiny_llama, quantize, n=8):
    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=n)
    model, tok = build_model(str(tiny_llama), task, dataset_size=n, quantize=quantize)
    return model, encode_examples(ex, tok, task.num_classes, max_length=64)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_logits_are_within_the_quantization_error(tiny_llama, kind):
    flt, data = _arc(tiny_llama, None)
    batch = data.batch(torch.arange(8))
    with torch.no_grad():
        ref = flt.logits_at(batch)
    pyro.clear_param_store()
    q, _ = _arc(tiny_llama, kind)
    layer = q.peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    with torch.no_grad():
        out = q.logits_at(batch)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < (0.05 if kind == "int8" else 0.15), rel  # quantized (not equal), and close
    assert all(p.dtype == torch.float32 for p in q.params.values())
    assert all(s.module.weight.dtype == torch.float32 for s in q.sites)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guide", ["map", "blob", "normal", "lowrank"])
def test_every_guide_trains_every_site_on_a_quantized_base(tiny_llama, kind, guide):
    model, data = _arc(tiny_llama, kind)
    g = make_guide(guide, model, blob_eps=0.05, sigma_param="square", normal_init_scale=0.01)
    batch = data.batch(torch.arange(4))
    g(**batch)
    before = {k: v.clone() for k, v in guide_median(g, batch).items()}
    b_before = {k: p.detach().clone() for k, p in model.params.items()}
    SVITrainer(model, g, OptimConfig(steps=3, batch_size=4, lr=5e-2, warmup_ratio=0.0), progress=False).fit(data)
    after = guide_median(g, batch)
    for name in model.site_names:
        assert not torch.allclose(after[name], before[name]), name
    for name, p in model.params.items():
        assert not torch.equal(p.detach(), b_before[name]), name


def _quantized_linear(kind, weight):
    d_out, d_in = weight.shape
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=False, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_kfac_of_a_quantized_layer_equals_its_exact_fisher(kind):
    """One example through one quantized linear layer with LoRA: K-FAC is exact there, so its
    factors' Kronecker product must equal the per-example gradient's outer product, computed by
    autograd through the quantized layer."""
    torch.manual_seed(0)
    d_in, d_out = 64, 32
    base = nn.Module()
    base.lin = _quantized_linear(kind, torch.randn(d_out, d_in) * 0.1)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["lin"]))
    model = BayesianLoRAModel(peft, LinearHead(), b_site=True, dataset_size=1)
    with torch.no_grad():
        for s in model.sites:
            s.module.weight.normal_(0, 0.5)
    data = EncodedDataset(torch.randn(1, 1, d_in), torch.ones(1, 1, dtype=torch.long), torch.tensor([1]),
                          torch.ones(1, d_out, dtype=torch.bool))
    factors = fit_kfac(model, data, KFACConfig(fisher="empirical", n_kfac=100), progress=False)
    exact = _grad_outer(model, data, 0)
    for name in model.site_names:
        S, A = factors.factors[name]
        kron = torch.kron(S.to_matrix(), A.to_matrix())
        torch.testing.assert_close(kron, exact[name], rtol=1e-4, atol=1e-7 * float(exact[name].abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_run_records_reloads_and_its_adapter_loads_in_plain_peft(tiny_llama, tmp_path, kind):
    cfg = SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tiny_llama), "quantize": kind},
                               "guide": {"name": "blob"}, "data": {"train_limit": 8, "test_limit": 4, "max_length": 64},
                               "eval": {"samples": 2}, "optim": {"steps": 2, "batch_size": 4, "lr": 1e-2}})
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["model"]["quantize"] == kind
    again = evaluate(tmp_path / "run", progress=False)  # rebuilt with its quantization: the same numbers
    assert again.nll == pytest.approx(metrics["arc-easy/test"]["nll"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), tmp_path / "run" / "adapter")
    assert any("lora_A" in n for n, _ in plain.named_parameters())


def test_quantized_bytes_count_weights_and_quantization_constants(tiny_llama):
    """The byte count against the formats' layouts, layer by layer: int8 is one byte a weight and a
    float32 scale per output row; NF4 half a byte a weight, a float32 absmax per block of 64 and its
    16-entry float32 code book."""
    for kind in KINDS:
        pyro.clear_param_store()
        model, _ = _arc(tiny_llama, kind)
        layers = [m for m in model.peft_model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
        assert layers
        expected = 0
        for m in layers:
            n = m.in_features * m.out_features
            expected += n + 4 * m.out_features if kind == "int8" else n // 2 + 4 * -(-n // 64) + 4 * 16
        stored, as_float = quantized_linear_bytes(model.peft_model)
        assert stored == expected, kind
        assert as_float == sum(4 * m.in_features * m.out_features for m in layers)


def test_quantize_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="int8, nf4"):
        check_quantize("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda or cpu"):
        check_quantize("nf4", torch.device("mps"))
    with pytest.raises(ValueError, match="quantize must be one of"):
        SVIConfig.from_dict({"model": {"quantize": "fp8"}})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        check_quantize("nf4", torch.device("cpu"))
