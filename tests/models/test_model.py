"""The Pyro model: sites, parameters, plate, and Pyro's own guides against it unchanged."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from peft import PeftModel
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.poutine.util import site_is_subsample
from torch import nn
from transformers import AutoModelForCausalLM

from pyro_llm.models import LoRASite, lora_product


def _batch(data, n=4):
    return data.batch(torch.arange(n))


def test_sites_are_named_by_module_path_and_typed(arc_model):
    model, _ = arc_model
    assert model.site_names == [f"base_model.model.model.layers.{i}.self_attn.{p}.lora_A" for i in range(2) for p in ("q_proj", "v_proj")]
    assert all(isinstance(s.module, LoRASite) and s.shape == (8, 32) for s in model.sites)


def test_only_lora_B_enters_the_param_store(arc_model):
    model, data = arc_model
    tr = poutine.trace(model).get_trace(**_batch(data))
    store = pyro.get_param_store()
    assert set(store.keys()) == set(model.params) and all(".lora_B.default." in k for k in store.keys())
    latent = [n for n, s in tr.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    assert latent == model.site_names
    base_params = [p for n, p in model.peft_model.named_parameters() if "lora" not in n]
    assert not any(p.requires_grad for p in base_params)


def test_plate_scales_likelihood_by_n_over_batch(arc_model):
    model, data = arc_model
    tr = poutine.trace(model).get_trace(**_batch(data, 4))
    assert tr.nodes["obs"]["scale"] == pytest.approx(len(data) / 4)


def test_step_zero_equals_base_model(arc_model, tiny_llama):
    model, data = arc_model
    batch = _batch(data)
    logits = model(**batch)  # A from the prior, B = 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    ref = out[torch.arange(4), last][:, model.head.token_ids]
    ref = ref.masked_fill(~batch["choice_mask"], -1e9)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_sample_batched_product_equals_loop():
    x = torch.randn(3 * 2, 5, 7)
    w = torch.randn(3, 4, 7)
    out = lora_product(x, w)
    ref = torch.cat([x[2 * s:2 * s + 2] @ w[s].T for s in range(3)])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("guide_cls,elbo", [(AutoDelta, Trace_ELBO), (AutoNormal, TraceMeanField_ELBO)])
def test_pyro_autoguides_train_with_pyro_svi(arc_model, guide_cls, elbo):
    model, data = arc_model
    guide = guide_cls(model, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), elbo())
    batch = _batch(data, 8)
    losses = [svi.step(**batch) for _ in range(25)]
    assert sum(losses[-5:]) < sum(losses[:5])
    names = set(pyro.get_param_store().keys())
    assert set(model.params) <= names
    assert not any("embed_tokens" in n or "q_proj.weight" in n or "base_layer" in n for n in names)


def test_predictive_returns_logits_and_site_samples(arc_model):
    model, data = arc_model
    guide = AutoNormal(model, init_loc_fn=model.init_loc_fn())
    batch = _batch(data)
    guide(**batch)  # the guide is built from the model with observed labels, as in training
    batch.pop("labels")
    out = Predictive(model, guide=guide, num_samples=3, return_sites=["logits", model.site_names[0]])(**batch)
    assert out["logits"].shape == (3, 4, 5)
    assert out[model.site_names[0]].reshape(3, 8, 32).std(0).gt(0).all()  # three distinct draws


def test_b_site_option_makes_B_latent(tiny_llama):
    from pyro_llm.data import get_task
    from pyro_llm.models import build_model

    model, _ = build_model(str(tiny_llama), get_task("arc-easy"), b_site=True)
    assert len(model.sites) == 8 and model.sites[1].name.endswith("q_proj.lora_B")
    assert model.params == {}


def test_saved_adapter_loads_with_peft(arc_model, tiny_llama, tmp_path):
    model, data = arc_model
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), Trace_ELBO())
    batch = _batch(data)
    for _ in range(3):
        svi.step(**batch)
    from pyro_llm.guides import write_back_means

    write_back_means(model, guide, batch)
    model.peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ours = model.logits_at(batch)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
        out = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    ref = out[torch.arange(4), last][:, model.head.token_ids].masked_fill(~batch["choice_mask"], -1e9)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, ours * 0)


def test_encoder_classification_model(tiny_bert):
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import build_model

    task = get_task("sst2")
    ex = load_examples(task, "train", limit=16)
    model, tok = build_model(str(tiny_bert), task, dataset_size=len(ex))
    data = encode_examples(ex, tok, 2)
    assert model.site_names[0].endswith("attention.self.query.lora_A")
    assert any("classifier" in n for n in model.params)
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(**data.batch(torch.arange(16))) for _ in range(15)]
    assert losses[-1] < losses[0]


def test_decoder_classifier_on_a_classification_task(tiny_llama):
    """A causal LM checkpoint on a classification task: LoRA goes on its own q/v projections and
    the new score head reads each example's last real token, whatever the padding."""
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import build_model, default_targets

    task = get_task("sst2")
    ex = load_examples(task, "train", limit=6)
    model, tok = build_model(str(tiny_llama), task, dataset_size=len(ex))
    assert model.site_names[0].endswith("self_attn.q_proj.lora_A")
    assert any(".score." in n for n in model.params)
    data = encode_examples(ex, tok, 2)
    batch = data.batch(torch.arange(6))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # some rows are padded
    padded = model.logits_at({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    for i in range(6):
        n = int(lengths[i])
        alone = model.logits_at({"input_ids": batch["input_ids"][i:i + 1, :n],
                                 "attention_mask": batch["attention_mask"][i:i + 1, :n]})
        torch.testing.assert_close(padded[i], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no query/value projections"):
        default_targets(nn.Sequential(nn.Linear(2, 2)))


def test_prior_is_swappable_per_site(arc_model):
    from pyro_llm.priors import GaussianPrior, LaplacePrior, SitePrior

    model, data = arc_model
    model.prior = SitePrior({r".*v_proj.*": LaplacePrior(0.1)}, default=GaussianPrior(0.3))
    tr = poutine.trace(model).get_trace(**_batch(data))
    v = tr.nodes[model.site_names[1]]["fn"].base_dist
    q = tr.nodes[model.site_names[0]]["fn"].base_dist
    assert isinstance(v, dist.Laplace) and isinstance(q, dist.Normal)
    assert torch.allclose(q.scale, torch.tensor(0.3))
