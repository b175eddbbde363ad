"""A trained mean-field Gaussian guide under another Gaussian prior, without retraining.

At a stationary point of the ELBO (tempered by a KL weight ``w`` or not) with the prior
``N(0, 1 / lambda_0)`` on every entry, each entry's variational precision is the prior's plus the
likelihood's (Opper & Archambeau 2009):

    sigma^-2 = lambda_0 + (N / w) E_q[d^2 loss / d theta^2]

so the likelihood's share ``d = sigma^-2 - lambda_0`` (clamped at zero) can be read off the trained
scales, and the same posterior under the precision ``lambda`` has ``sigma_lambda^-2 = d + lambda``,
its means kept. A guide trained with the KL weighted by ``w`` (``--kl-weight``, ``--preset
blob-adam``'s 0.1) balanced against a likelihood counted ``1 / w`` times (a cold posterior:
``sigma^-2 = lambda_0 + d / w``); reading it with its ``kl_weight`` undoes that temperature, so the
posterior under ``lambda`` is the Bayesian one of the model as written (``d`` the likelihood's share
counted once), whatever temperature made the optimisation convenient. This is the variational
counterpart of Laplace-LoRA's prior precision chosen after the fit (where the curvature is K-FAC's
and the mean the MAP): :func:`search_prior_precision` chooses ``lambda`` by the linearised
predictive's validation NLL, every grid point from one pass
(:func:`~pyro_llm.evaluation.glm.glm_logit_moments` with one set of variances per point).

A prior that is wider than the one trained under lets the predictive widen where the data left
the weights free (``d`` small), which is what a steep logit scale (a cloze head's summed
log-likelihoods) needs and the training prior may not allow. The formula assumes the scales have
reached their balance with the likelihood; a guide stopped before (its ``sigma`` still drifting)
reads a ``d`` between its start's and its balance's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..data.collate import EncodedDataset
from ..evaluation.glm import GLM_MAX_TOKENS, glm_logit_moments, probit_probs
from ..guides.ops import guide_scales
from ..models.model import BayesianLoRAModel

__all__ = ["PRIOR_PRECISION_GRID", "PriorSearch", "data_precisions", "search_prior_precision", "variances_at"]

#: the precisions :func:`search_prior_precision` tries by default, the trained prior's own added:
#: Laplace's validation grid (``10^-2 .. 10^4``, quarter decades) extended down to ``10^-6``. Read
#: under a prior of precision ``lambda``, the entries the data left free (``d = 0``) have variance
#: ``1 / lambda``, so the validation NLL can go on falling below ``10^-2`` before it turns back up
#: towards the uniform predictive's (``lambda -> 0``); the wider grid lets it turn inside (PIQA's
#: A-and-B guide at KL weight 0.1: its minimum near ``10^-4``)
PRIOR_PRECISION_GRID = tuple(float(x) for x in torch.logspace(-6, 4, 41, dtype=torch.float64))


def data_precisions(scales: Mapping[str, torch.Tensor], prior_precision: float,
                    kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The likelihood's share of each entry's precision, ``w (sigma^-2 - lambda_0)`` (at least 0), from a
    trained mean-field guide's ``scales``, the precision ``lambda_0`` of the prior it was trained under
    and the weight ``w`` its KL had when its scales settled (1: the exact ELBO)."""
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision!r}")
    if not kl_weight > 0:
        raise ValueError(f"kl_weight must be > 0 to read the likelihood's share off the scales, got {kl_weight!r}")
    return {n: (s.detach().double().pow(-2) - prior_precision).clamp_min(0.0) * kl_weight
            for n, s in scales.items()}


def variances_at(data: Mapping[str, torch.Tensor], prior_precision: float) -> dict[str, torch.Tensor]:
    """Each entry's variance ``1 / (d + lambda)`` under the prior precision ``lambda``."""
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision!r}")
    return {n: 1.0 / (d + prior_precision) for n, d in data.items()}


@dataclass
class PriorSearch:
    """The chosen precision, the validation NLL of every grid point, and the per-site scales
    ``sigma_lambda`` at the chosen one (to evaluate with, e.g. :func:`glm_logit_moments`'s ``variances``)."""

    prior_precision: float
    trained_precision: float
    validation_nll: dict[float, float]
    variances: dict[str, torch.Tensor]


def search_prior_precision(guide: Any, validation: EncodedDataset, trained_precision: float, *,
                           kl_weight: float = 1.0, model: BayesianLoRAModel | None = None,
                           grid: Sequence[float] = PRIOR_PRECISION_GRID,
                           batch_size: int = 4, max_tokens: int | None = GLM_MAX_TOKENS,
                           progress: bool = False) -> PriorSearch:
    """Choose the prior precision of a trained mean-field ``guide`` (one reporting its scales,
    trained under ``N(0, 1 / trained_precision)`` with its KL weighted by ``kl_weight``) by the
    linearised predictive's NLL on ``validation``, among ``grid`` and ``trained_precision`` itself
    (the trained guide, untempered), in one pass."""
    scales = guide_scales(guide)
    if scales is None:
        raise TypeError(f"search_prior_precision needs a mean-field Gaussian guide that reports its scales; "
                        f"{type(guide).__name__} does not")
    if len(validation) == 0:
        raise ValueError("search_prior_precision needs a non-empty validation set")
    points = sorted({float(trained_precision), *map(float, grid)})
    d = data_precisions(scales, trained_precision, kl_weight)
    sets = [variances_at(d, lam) for lam in points]
    mean, cov = glm_logit_moments(guide, validation, variances=sets, model=model, batch_size=batch_size,
                                  max_tokens=max_tokens, progress=progress, relative=True)
    labels = validation.labels[:, None]
    nll = {lam: float(-probit_probs(mean, c).gather(1, labels).clamp_min(1e-12).log().mean())
           for lam, c in zip(points, cov)}
    best = min(nll, key=nll.__getitem__)
    if len(points) > 1 and best in (points[0], points[-1]):
        warnings.warn(f"the validation NLL is lowest at the grid's {'smallest' if best == points[0] else 'largest'} "
                      f"prior precision ({best:g}); it may fall further beyond the grid", stacklevel=2)
    return PriorSearch(best, float(trained_precision), nll, sets[points.index(best)])
