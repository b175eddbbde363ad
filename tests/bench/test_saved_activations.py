"""``bench.saved_activations`` counts what a forward keeps for its backward: activations, which
grow with the batch's tokens, and not the model's own weights (saved by every matmul)."""

import torch

from bench.saved_activations import saved_bytes


def test_saved_bytes_grow_with_the_tokens_and_leave_the_weights_out(arc_model):
    model, data = arc_model
    batch = data.batch(torch.arange(2))
    twice = {k: torch.cat([v, v]) for k, v in batch.items()}
    one, two = sum(saved_bytes(model, batch).values()), sum(saved_bytes(model, twice).values())
    assert 1.8 * one <= two <= 2.0 * one  # twice the rows: twice the activations (less the shared few)
    assert saved_bytes(model, batch)["width 32"] > 0  # the tiny Llama's hidden states are among them
    # eight tokens of one row keep far less than the output layer's weight, which the answer
    # logits' matmul saves: counted, it alone would exceed them
    short = dict(batch, input_ids=batch["input_ids"][:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long),
                 choice_mask=batch["choice_mask"][:1])
    head = model.peft_model.get_output_embeddings().weight
    assert sum(saved_bytes(model, short).values()) < 0.5 * head.numel() * head.element_size()
