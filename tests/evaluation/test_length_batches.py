"""Evaluation passes batch rows of neighbouring lengths (less padding) and still return every
row's result in row order."""

from __future__ import annotations

import torch

from pyro_llm.data import EncodedDataset, in_row_order
from pyro_llm.evaluation import mean_logits


def _row(data: EncodedDataset, i: int) -> EncodedDataset:
    return EncodedDataset(data.input_ids[i:i + 1], data.attention_mask[i:i + 1], data.labels[i:i + 1],
                          data.choice_mask[i:i + 1])


def test_length_batches_cover_every_row_once_with_less_padding(arc_model):
    _, data = arc_model
    lengths = data.attention_mask.sum(1)
    assert lengths.unique().numel() > 4  # the rows really differ in length
    batches = data.by_length(4)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(data)))
    widths = [int(lengths[b].max()) for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    padded = sum(w * len(b) for w, b in zip(widths, batches))
    in_order = sum(int(lengths[b].max()) * len(b) for b in data.sequential(4))
    assert padded < in_order


def test_in_row_order_inverts_the_batching():
    batches = [torch.tensor([3, 0]), torch.tensor([2]), torch.tensor([1, 4])]
    parts = [torch.tensor([[30.], [0.]]), torch.tensor([[20.]]), torch.tensor([[10.], [40.]])]
    assert in_row_order(batches, parts).flatten().tolist() == [0., 10., 20., 30., 40.]
    covs = [p[None] for p in parts]  # rows along dim 1
    assert in_row_order(batches, covs, dim=1).flatten().tolist() == [0., 10., 20., 30., 40.]


def test_predictions_come_back_in_row_order(arc_model):
    model, data = arc_model
    with torch.no_grad():
        for p in model.params.values():
            p.normal_(0, 0.3)
    values = model.point_values()
    together = mean_logits(model, values, data, batch_size=4)
    alone = torch.cat([mean_logits(model, values, _row(data, i), batch_size=1) for i in range(len(data))])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_a_token_bound_cuts_batches_to_it(arc_model):
    _, data = arc_model
    lengths = data.attention_mask.sum(1)
    bound = 3 * int(lengths.max())  # three of the longest rows; more of the shorter ones
    batches = data.by_length(8, max_tokens=bound)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(data)))
    assert all(len(b) <= 8 and len(b) * int(lengths[b].max()) <= bound for b in batches)
    assert len(batches[0]) == 3 and max(len(b) for b in batches) > 3  # the bound, not a row count, cut them
    assert [len(b) for b in data.by_length(8, max_tokens=1)] == [1] * len(data)  # a row over the bound is alone
