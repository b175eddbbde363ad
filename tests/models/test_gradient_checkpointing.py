"""Activation checkpointing: the layers really are recomputed in the backward pass, and BLoB's
gradients under Flipout equal those without checkpointing (the signs are replayed)."""

import pyro
import pytest
import torch

from pyro_llm.data import encode_examples, get_task, load_examples
from pyro_llm.guides import BLoBGuide
from pyro_llm.infer import OptimConfig, SVITrainer
from pyro_llm.models import LoRAOptions, build_model


def _trainer(tiny_llama, checkpointing, steps_before):
    """A BLoB trainer on the tiny Llama after ``steps_before`` steps (after one, Flipout has learnt
    which sites share inputs), everything seeded."""
    pyro.clear_param_store()
    task = get_task("arc-easy")
    ex = load_examples(task, "train", limit=8)
    model, tok = build_model(str(tiny_llama), task, lora=LoRAOptions(rank=2), dataset_size=8,
                             gradient_checkpointing=checkpointing)
    data = encode_examples(ex, tok, task.num_classes, max_length=64)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.3)  # B != 0: A's Flipout noise reaches the loss
    trainer = SVITrainer(model, BLoBGuide(model), OptimConfig(steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0),
                         use_flipout=True, progress=False)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    trainer.fit(data, stop_after=steps_before)
    return model, data, trainer


def _gradients(tiny_llama, checkpointing, steps_before=1):
    model, data, trainer = _trainer(tiny_llama, checkpointing, steps_before)
    calls = []
    attn = model.peft_model.get_base_model().model.layers[0].self_attn
    hook = attn.register_forward_hook(lambda *a: calls.append(1))
    batch = data.batch(torch.arange(4, 8))
    with trainer._handlers(1):
        loss = trainer._loss(batch)
        loss.backward()
    hook.remove()
    store = dict(pyro.get_param_store().named_parameters())
    return {n: store[n].grad.clone() for n in trainer.param_names}, len(calls), float(loss)


@pytest.mark.parametrize("steps_before", [0, 1])
def test_checkpointed_gradients_equal_plain_ones_under_flipout(tiny_llama, steps_before):
    plain, plain_calls, plain_loss = _gradients(tiny_llama, False, steps_before)
    ckpt, ckpt_calls, ckpt_loss = _gradients(tiny_llama, True, steps_before)
    assert plain_calls == 1 and ckpt_calls == 2  # the layer ran again in the backward pass
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys() and any("blob.G" in n for n in plain)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_without_the_handler_the_recomputation_would_differ(tiny_llama):
    """The check above can fail: replaying needs Flipout active during the backward pass. Run the
    backward outside the handler and the checkpointed gradients move away from the plain ones."""
    plain, _, _ = _gradients(tiny_llama, False)
    model, data, trainer = _trainer(tiny_llama, True, 1)
    batch = data.batch(torch.arange(4, 8))
    loss = trainer.loss(batch, 1)  # the handlers exit here
    try:  # the recomputation makes plain products: torch notices the changed graph, or the gradients differ
        loss.backward()
    except torch.utils.checkpoint.CheckpointError:
        return
    store = dict(pyro.get_param_store().named_parameters())
    differs = [n for n in trainer.param_names if not torch.allclose(store[n].grad, plain[n], rtol=1e-5, atol=1e-7)]
    assert differs
