"""A prior that samples its own scale works wherever a fixed prior does, the vectorised
``Predictive(parallel=True)`` included (the hyper-parameter then carries the sample dimension)."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive

from pyro_llm import HierarchicalGaussianPrior
from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import LoRAOptions, build_model
from pyro_llm.priors import iid_over


def test_iid_over_equals_expand_without_batch_and_keeps_batch_dimensions():
    shape = torch.Size([3, 5])
    value = torch.randn(shape, dtype=torch.float64)
    base = dist.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(iid_over(base, shape).log_prob(value), base.expand(shape).to_event(2).log_prob(value))
    tau = torch.tensor([[0.5], [2.0]], dtype=torch.float64)  # (S, 1), as a vectorised plate draws it
    d = iid_over(dist.Normal(torch.zeros_like(tau), tau), shape)
    assert d.batch_shape == (2, 1) and d.event_shape == shape
    values = torch.randn(2, 1, *shape, dtype=torch.float64)
    expected = torch.stack([dist.Normal(0.0, float(t)).log_prob(v).sum() for t, v in zip(tau[:, 0], values[:, 0])])
    torch.testing.assert_close(d.log_prob(values)[:, 0], expected)


def test_hierarchical_prior_trains_and_predicts_in_parallel_as_sequentially(tiny_llama):
    spec = get_task("arc-easy")
    examples = load_examples(spec, "train", limit=8)
    model, tok = build_model(str(tiny_llama), spec, lora=LoRAOptions(rank=2), dataset_size=8,
                             prior=HierarchicalGaussianPrior(0.2))
    data = encode_examples(examples, tok, spec.num_classes, max_length=64)
    guide = BLoBGuide(model)
    SVITrainer(model, guide, OptimConfig(steps=2, batch_size=4, lr=5e-2, warmup_ratio=0.0), progress=False).fit(data)
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.5)  # B != 0, so A's noise reaches the logits
        pyro.param("blob.G").fill_(0.5)
    batch = data.batch(torch.arange(3))
    batch.pop("labels")
    S = 64
    tau_site = f"{model.site_names[0]}_tau"
    out = {}
    for parallel in (False, True):
        pyro.set_rng_seed(3)
        out[parallel] = Predictive(model, guide=guide, num_samples=S, parallel=parallel,
                                   return_sites=["logits", tau_site])(**batch)
    taus = out[True][tau_site].reshape(S)
    assert float(taus.std()) > 0  # the hyper-parameter really varies along the sample dimension
    p_seq, p_par = (out[k]["logits"].reshape(S, 3, -1).softmax(-1) for k in (False, True))
    offered = batch["choice_mask"]
    assert (p_par.std(0)[offered] > 1e-4).all()
    se = ((p_seq.var(0) + p_par.var(0)) / S).sqrt()
    assert ((p_seq.mean(0) - p_par.mean(0)).abs() <= 5 * se + 1e-6).all()
