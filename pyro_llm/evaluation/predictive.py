"""The N-sample predictive ``p(y|x) = 1/N sum_s softmax(f(x; A_s))``, ``A_s ~ q``.

Probabilities are averaged, never logits. The ``N`` weight samples are evaluated batched: the
sample dimension is folded into the batch (each site's value gets a leading ``S`` dimension and
the batch is stacked ``S`` times, see :func:`pyro_llm.models.lora.lora_product`), in chunks of at
most ``max_rows`` rows so memory stays bounded. ``num_samples = 0`` evaluates the guide's mean.
With ``flipout=True`` (the BLoB reference's evaluation) each of the ``N`` passes runs under the
Flipout handler, so every token sees its own sign-flipped perturbation of the pass's draw; those
passes are not stacked (the handler leaves stacked samples alone).

Each batch draws its weights from its own seed (the pass's seed, from the global generator, plus
the batch's number), so a pass shared among several ranks (:mod:`pyro_llm.ranks`: each its
share of the batches, all receiving the whole result) predicts what one process does.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from .. import ranks
from ..data.collate import EncodedDataset, in_row_order
from ..guides.ops import guide_median, guide_sample
from ..models.model import BayesianLoRAModel
from ..poutine import FlipoutMessenger

__all__ = ["predict_proba", "mean_logits"]


def _stack_batch(batch: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.items() if k in
            ("input_ids", "attention_mask", "choice_mask", "token_type_ids")}


def _chunks(total: int, size: int) -> Iterator[int]:
    done = 0
    while done < total:
        yield min(size, total - done)
        done += size


@torch.no_grad()
def predict_proba(model: BayesianLoRAModel, guide: Any, data: EncodedDataset, *, num_samples: int = 10,
                  batch_size: int = 8, max_rows: int = 64, device: torch.device | str | None = None,
                  progress: bool = True, desc: str = "predict", resample_guide: bool = True,
                  flipout: bool = False) -> torch.Tensor:
    """Predictive probabilities ``[len(data), C]`` under ``guide``.

    :param num_samples: weight samples ``N`` (``0``: the guide's mean/median weights).
    :param max_rows: bound on rows per forward pass (``samples x batch``); lower it to save memory.
    :param resample_guide: draw weights from the guide per sample (``False``: the guide's median
        every time, the randomness coming from the network itself, e.g. MC dropout).
    :param flipout: every pass under Flipout (module docstring); one sample per forward pass.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    device = torch.device(device or model.device)
    seed = int(torch.randint(2 ** 62, ()))  # advances the caller's generator, as drawing the weights would
    batches = data.by_length(batch_size)
    mine = ranks.shard(range(len(batches)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = [_predict_batch(model, guide, data.batch(batches[i], device), num_samples, max_rows, resample_guide,
                              flipout, seed + i)
               for i in tqdm(mine, desc=desc, disable=not progress, leave=False)]
    return ranks.rows_across([batches[i] for i in mine], out, (len(data), data.choice_mask.shape[1]), torch.float32)


def _predict_batch(model: BayesianLoRAModel, guide: Any, batch: dict[str, torch.Tensor], num_samples: int,
                   max_rows: int, resample_guide: bool, flipout: bool, seed: int) -> torch.Tensor:
    """One batch's predictive probabilities (on the CPU), its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    device = batch["input_ids"].device
    rows = batch["input_ids"].shape[0]
    if num_samples == 0:
        return model.logits_at(_stack_batch(batch, 1), guide_median(guide, batch)).softmax(-1).float().cpu()
    acc = torch.zeros(rows, batch["choice_mask"].shape[1], dtype=torch.float64, device=device)
    if flipout and resample_guide:
        handler = FlipoutMessenger(sites=model.site_names)
        for _ in range(num_samples):
            with handler:
                draw = guide_sample(guide, batch, model.site_names)
                logits = model.logits_at(_stack_batch(batch, 1), draw)
            acc += logits.softmax(-1).double()
        return (acc / num_samples).float().cpu()
    per_pass = max(1, max_rows // rows)
    for s in _chunks(num_samples, per_pass):
        draws = [guide_sample(guide, batch, model.site_names) if resample_guide else guide_median(guide, batch)
                 for _ in range(s)]
        stacked = {name: torch.stack([d[name] for d in draws]) for name in model.site_names}
        logits = model.logits_at(_stack_batch(batch, s), stacked if s > 1 else draws[0])
        acc += logits.softmax(-1).double().view(s, rows, -1).sum(0)
    return (acc / num_samples).float().cpu()


@torch.no_grad()
def mean_logits(model: BayesianLoRAModel, values: dict[str, torch.Tensor], data: EncodedDataset, *,
                batch_size: int = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """Logits ``[len(data), C]`` at fixed site values (e.g. the MAP)."""
    device = device or model.device
    out = []
    batches = data.by_length(batch_size)
    for idx in batches:
        batch = data.batch(idx, device)
        out.append(model.logits_at(_stack_batch(batch, 1), values).cpu())
    return in_row_order(batches, out)
