"""LoRA on the class head (the BLoB reference's ``--apply-classhead-lora``) of a model whose output
layer is tied to its input embeddings (SmolLM2's layout): the head's ``A`` is a site like any other,
training moves it and its ``B``, the shared embedding weight is untouched, and the saved adapter
(without a copy of the embeddings) reloads in plain peft to the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pyro_llm.runs import SVIConfig, load_run, train

from tiny import save_tiny_llama


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tied-llama"), tie=True)


@pytest.mark.parametrize("guide", ["blob", "map"])
def test_tied_class_head_trains_saves_and_reloads_in_peft(tied_llama, tmp_path, guide):
    base = AutoModelForCausalLM.from_pretrained(str(tied_llama))
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # really tied
    embeddings = base.get_input_embeddings().weight.detach().clone()
    cfg = SVIConfig.from_dict({"task": "arc-easy", "model": {"name": str(tied_llama)}, "guide": {"name": guide},
                               "lora": {"class_head": True}, "data": {"train_limit": 16, "test_limit": 8,
                                                                      "max_length": 64},
                               "eval": {"samples": 2}, "optim": {"steps": 4, "batch_size": 4, "lr": 5e-2,
                                                                 "warmup_ratio": 0.0}})
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False)
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    head = {k: v for k, v in saved.items() if "lm_head" in k}
    assert {k.rsplit(".", 2)[-2] for k in head} == {"lora_A", "lora_B"}  # the adapter, not a copy of the weight
    assert not any("embed" in k for k in saved)
    assert all(v.abs().max() > 0 for k, v in head.items() if "lora_B" in k)  # B left its zero init

    run = load_run(run_dir)
    site = next(s for s in run.model.sites if "lm_head" in s.name)
    assert site.module.weight.shape[1] == embeddings.shape[1]
    peft_in = run.model.peft_model.get_input_embeddings().weight
    torch.testing.assert_close(peft_in.detach(), embeddings, rtol=0, atol=0)  # the shared weight is unchanged

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tied_llama)), str(run_dir / "adapter"))
    plain.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = run.model.peft_model(input_ids=ids, attention_mask=mask).logits
        theirs = plain(input_ids=ids, attention_mask=mask).logits
        bare = AutoModelForCausalLM.from_pretrained(str(tied_llama))(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - bare).abs().max() > 1e-4  # the adapter (the head's included) changes the output
    with torch.no_grad():
        plain.base_model.model.lm_head.lora_B["default"].weight.zero_()
        without_head = plain(input_ids=ids, attention_mask=mask).logits
    assert (theirs - without_head).abs().max() > 1e-5  # and the head's own LoRA contributes
