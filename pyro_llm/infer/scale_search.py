"""A training-free Gaussian guide around a trained LoRA: ``q(A) = N(A*, s^2 I)``, one scale ``s``
for every ``A`` entry, chosen on held-out data.

In the spirit of training-free Bayesianization (TFB, Shi et al. 2024): the means are the trained
adapter's ``A`` (a MAP run's, say) and only the width is searched, here by the N-sample predictive's
negative log-likelihood on a validation split over a grid of ``s`` (TFB instead takes the widest
``sigma`` whose anchor-set loss stays within a tolerance, with a structure from ``B``'s singular
values). The guide it returns is a :class:`~pyro_llm.guides.BLoBGuide` whose ``M`` is ``A*`` and
whose ``sigma`` is ``s`` everywhere, so every predictive, Flipout included, applies unchanged. No
gradient step is taken: the cost is one validation pass of ``N`` samples per grid point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pyro
import torch

from ..data.collate import EncodedDataset
from ..evaluation.metrics import compute_metrics
from ..evaluation.predictive import predict_proba
from ..models.model import BayesianLoRAModel
from ..guides.blob import BLoBGuide

__all__ = ["ScaleSearch", "search_scale"]


@dataclass
class ScaleSearch:
    """The guide at the chosen scale, the scale, and the validation NLL of every grid point."""

    guide: BLoBGuide
    scale: float
    validation_nll: dict[float, float]


def _set_scale(guide: BLoBGuide, scale: float) -> None:
    G = guide.flat_params()[1]
    with torch.no_grad():
        value = math.sqrt(scale) if guide.sigma_param == "square" else scale + math.log(-math.expm1(-scale))
        G.fill_(value)


def search_scale(model: BayesianLoRAModel, validation: EncodedDataset, grid: Sequence[float], *,
                 num_samples: int = 10, batch_size: int = 8, max_rows: int = 64, seed: int = 0,
                 flipout: bool = False, prefix: str = "scale_search", progress: bool = False) -> ScaleSearch:
    """Search ``s`` over ``grid`` around the adapter ``model`` holds now (its sites' module weights,
    e.g. a loaded MAP run's) and return the guide at the ``s`` of the lowest validation NLL.

    Every grid point is scored with the same draws (``seed``), so the comparison is paired."""
    if not grid or any(not (isinstance(s, (int, float)) and 0 < s < math.inf) for s in grid):
        raise ValueError(f"grid must be positive finite scales, got {list(grid)!r}")
    guide = BLoBGuide(model, prefix=prefix)
    guide.flat_params()  # M from the sites' current weights: the trained A
    table: dict[float, float] = {}
    for s in grid:
        _set_scale(guide, float(s))
        pyro.set_rng_seed(seed)
        probs = predict_proba(model, guide, validation, num_samples=num_samples, batch_size=batch_size,
                              max_rows=max_rows, progress=progress, desc=f"scale {s:g}", flipout=flipout)
        table[float(s)] = compute_metrics(probs, validation.labels).nll
    best = min(table, key=table.__getitem__)
    _set_scale(guide, best)
    return ScaleSearch(guide, best, table)
