"""Small models for curvature tests: one LoRA linear layer as a BayesianLoRAModel (its exact
per-example Fisher is a few lines of autograd), and the tiny Llama with A and B sites."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pyro_llm.data import EncodedDataset
from pyro_llm.models import BayesianLoRAModel


class OneLinear(nn.Module):
    def __init__(self, d_in=5, d_out=3):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)


class LinearHead:
    def __call__(self, model, input_ids, attention_mask, token_type_ids=None):
        return model.base_model.model.lin(input_ids)[:, 0, :]


def one_linear_model(n=1, d_in=5, d_out=3, r=2, seed=0):
    torch.manual_seed(seed)
    peft = get_peft_model(OneLinear(d_in, d_out), LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    model = BayesianLoRAModel(peft, LinearHead(), b_site=True, dataset_size=n)
    with torch.no_grad():
        for s in model.sites:
            s.module.weight.normal_(0, 0.5)
    x = torch.randn(n, 1, d_in)
    data = EncodedDataset(x, torch.ones(n, 1, dtype=torch.long), torch.randint(0, d_out, (n,)),
                          torch.ones(n, d_out, dtype=torch.bool))
    return model, data


def _grad_outer(model, data, i):
    values = {k: v.clone().requires_grad_(True) for k, v in model.point_values().items()}
    batch = data.batch(torch.tensor([i]))
    logits = model.logits_at(batch, values)
    nll = -logits.log_softmax(-1)[0, batch["labels"][0]]
    grads = torch.autograd.grad(nll, [values[n] for n in model.site_names])
    return {n: torch.outer(g.flatten(), g.flatten()).double() for n, g in zip(model.site_names, grads)}


def laplace_model_of(tiny_llama):
    """The tiny Llama with A and B sites at a "trained" point (B != 0), and 12 ARC-Easy examples."""
    from pyro_llm.data import encode_examples, get_task, load_examples
    from pyro_llm.models import LoRAOptions, build_model

    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=12)
    model, tok = build_model(str(tiny_llama), task, lora=LoRAOptions(rank=2), b_site=True, dataset_size=len(ex))
    with torch.no_grad():
        for s in model.sites:
            s.module.weight.normal_(0, 0.3)
    return model, encode_examples(ex, tok, task.num_classes, max_length=64)
