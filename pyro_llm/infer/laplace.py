"""Fitting the Laplace guide: K-FAC at the MAP, then the prior precision.

The path from a trained MAP guide to a Laplace posterior is three lines::

    from pyro_llm.infer import fit_laplace
    fit = fit_laplace(model, train, guide=map_guide)      # writes the MAP means back, then K-FAC
    probs = predict_proba(model, fit.guide, test, num_samples=10)

``fit_laplace`` returns a :class:`LaplaceFit` (the :class:`~pyro_llm.guides.LaplaceGuide`, the
K-FAC factors and the evidence). Without ``guide`` it fits at the model's current point values (a
loaded adapter) and refuses an adapter still at LoRA's initialisation (every ``B = 0``), where the
curvature says nothing about fine-tuning.

The prior is the model's: a zero-mean Gaussian prior of standard deviation ``sigma`` is the prior
precision ``lambda = 1 / sigma^2``, used as it is or as the starting point of
:func:`optimize_prior_precision`, which maximises the Laplace evidence (``"marglik"``: Adam on
``log lambda`` at lr 0.1, the reference settings, until it stops moving: the reference's 100 steps
do not reach the optimum from a Gaussian prior's ``lambda = 25``) or minimises the validation NLL of the
GLM predictive over a log-spaced grid (``"val-nll"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..curvature.kfac import KFACConfig, KFACFactors, fit_kfac
from ..curvature.kron import KronBlock
from ..data.collate import EncodedDataset
from ..evaluation.glm import GLM_MAX_TOKENS, glm_logit_moments, probit_probs
from ..guides.ops import write_back_means
from ..guides.laplace import LaplaceGuide
from ..models.model import BayesianLoRAModel
from ..priors import gaussian_precision

__all__ = ["LaplaceFit", "PRIOR_PRECISION_METHODS", "blocks_from_factors", "fit_laplace", "optimize_prior_precision",
           "prior_precision_of", "tune_prior_precision"]

#: How :func:`optimize_prior_precision` tunes ``lambda``.
PRIOR_PRECISION_METHODS = ("marglik", "val-nll")


@dataclass
class LaplaceFit:
    guide: LaplaceGuide
    factors: KFACFactors
    log_marginal_likelihood: float


def prior_precision_of(model: BayesianLoRAModel) -> float:
    """``1 / sigma^2`` of the model's prior when it is one zero-mean Gaussian for every entry of
    every site (:func:`~pyro_llm.priors.gaussian_precision`); a clear error otherwise."""
    try:
        return gaussian_precision(model.prior, "the Laplace approximation")
    except ValueError as err:
        raise ValueError(f"{err}: pass prior_precision=<number>, 'marglik' or 'val-nll'") from None


def blocks_from_factors(model: BayesianLoRAModel, factors: KFACFactors,
                        values: dict[str, torch.Tensor] | None = None) -> dict[str, KronBlock]:
    values = values if values is not None else model.point_values()
    return {name: KronBlock(values[name].detach().clone(), *factors.factors[name]) for name in model.site_names}


def _by_marglik(guide: LaplaceGuide, log_likelihood: float, layerwise: bool, init: float, steps: int,
                lr: float) -> torch.Tensor:
    n = len(guide.model.sites) if layerwise else 1
    log_lam = torch.full((n,), float(torch.log(torch.tensor(init))), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=lr)
    for _ in range(steps):
        before = log_lam.detach().clone()
        opt.zero_grad()
        loss = -guide.log_marginal_likelihood(log_likelihood, log_lam.exp())
        loss.backward()
        opt.step()
        if (log_lam.detach() - before).abs().max() < 1e-5 * lr:  # converged
            break
    lam = log_lam.detach().exp()
    return lam if layerwise else lam[0]


def _by_validation_nll(guide: LaplaceGuide, validation: EncodedDataset, batch_size: int, max_tokens: int | None,
                       progress: bool) -> torch.Tensor:
    grid = torch.logspace(-2, 4, 25, dtype=torch.float64)
    mean, cov = glm_logit_moments(guide, validation, grid, batch_size=batch_size, max_tokens=max_tokens,
                                  progress=progress, relative=True)  # the probit reads differences only
    nll = torch.stack([-probit_probs(mean, c).gather(1, validation.labels[:, None]).clamp_min(1e-12).log().mean()
                       for c in cov])
    return grid[int(nll.argmin())]


def optimize_prior_precision(guide: LaplaceGuide, method: str = "marglik", *, log_likelihood: float | None = None,
                             validation: EncodedDataset | None = None, layerwise: bool = False,
                             init: float | None = None, steps: int = 2000, lr: float = 0.1, batch_size: int = 4,
                             max_tokens: int | None = GLM_MAX_TOKENS, progress: bool = False) -> torch.Tensor:
    """Tune the guide's prior precision; sets and returns it.

    :param method: ``"marglik"`` (needs ``log_likelihood``, the K-FAC pass's ``log p(D | W*)``;
        ``layerwise`` gives one ``lambda`` per site) or ``"val-nll"`` (needs ``validation``).
    :param init: the evidence search's start (default: the guide's current precision).
    """
    if method == "marglik":
        if log_likelihood is None:
            raise ValueError("method 'marglik' needs the log-likelihood at the MAP (LaplaceFit.factors.log_likelihood)")
        start = float(guide.prior_precision.reshape(-1)[0]) if init is None else init
        lam = _by_marglik(guide, log_likelihood, layerwise, start, steps, lr)
    elif method == "val-nll":
        if validation is None or len(validation) == 0:
            raise ValueError("method 'val-nll' needs a non-empty validation set")
        if layerwise:
            raise ValueError("method 'val-nll' tunes one scalar prior precision; layerwise needs 'marglik'")
        lam = _by_validation_nll(guide, validation, batch_size, max_tokens, progress)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(PRIOR_PRECISION_METHODS)}")
    guide.set_prior_precision(lam)
    return guide.prior_precision


def _at_initialisation(model: BayesianLoRAModel) -> bool:
    """Every ``B`` is zero: peft's initialisation, where the adapter has learnt nothing."""
    bs = [p for name, p in model.params.items() if ".lora_B." in name]
    bs += [s.module.weight for s in model.sites if s.matrix == "B"]
    return bool(bs) and all(not b.detach().any() for b in bs)


def _check_extent(model: BayesianLoRAModel, a_only: bool | None) -> None:
    has_b = any(s.matrix == "B" for s in model.sites)
    if a_only is True and has_b:
        raise ValueError("a_only=True, but the model's B matrices are sample sites: build it with b_site=False")
    if a_only is False and not has_b:
        raise ValueError("a_only=False asks for a posterior over A and B, but the model's B matrices are parameters: "
                         "build it with b_site=True (as `pyro-llm laplace` does)")
    if a_only is None and not has_b:
        warnings.warn("fit_laplace: a posterior over A only (this model's B matrices are parameters); `pyro-llm "
                      "laplace` fits A and B by default: build the model with b_site=True for that, or pass "
                      "a_only=True to say A alone is meant", UserWarning, stacklevel=3)


def fit_laplace(model: BayesianLoRAModel, train: EncodedDataset, config: KFACConfig = KFACConfig(), *,
                guide: Any = None, prior_precision: str | float | None = "marglik", layerwise: bool = False,
                validation: EncodedDataset | None = None, glm_max_tokens: int | None = GLM_MAX_TOKENS,
                glm_batch_size: int | None = None, progress: bool = True,
                generator: torch.Generator | None = None, a_only: bool | None = None) -> LaplaceFit:
    """K-FAC Laplace around the MAP (module docstring).

    :param guide: the trained point guide (``AutoDelta``, or any guide with ``median``); its
        estimate is written into the model first. ``None``: the model's current point values.
    :param prior_precision: ``None`` (the model's Gaussian prior, ``1 / sigma^2``), a positive
        number, or a method of :func:`optimize_prior_precision` started from the prior's value.
    :param layerwise: one ``lambda`` per site (``"marglik"`` only).
    :param validation: the validation set of ``"val-nll"``.
    :param glm_max_tokens: bound on the padded tokens of one batch of the validation set's GLM
        pass (``"val-nll"``; see :func:`~pyro_llm.evaluation.glm.glm_logit_moments`).
    :param glm_batch_size: examples per batch of that pass (default: the K-FAC pass's).
    :param a_only: the posterior covers the model's sites, so its extent is the model's: ``A`` and
        ``B`` for a model built with ``b_site=True`` (``pyro-llm laplace``'s default, the paper's),
        ``A`` alone for one whose ``B`` are parameters (``build_model``'s default, an SVI model).
        ``True`` / ``False`` states which is meant and refuses the other model; ``None`` accepts
        either and warns (:class:`UserWarning`) when ``B`` is left out.
    """
    _check_extent(model, a_only)
    if guide is not None:
        write_back_means(model, guide, train.batch(torch.arange(min(2, len(train))), model.device))
    elif _at_initialisation(model):
        raise ValueError("the adapter is at LoRA's initialisation (every B is zero): pass the trained guide "
                         "(fit_laplace(model, data, guide=guide)) or build the model from a trained adapter")
    if isinstance(prior_precision, str) and prior_precision not in PRIOR_PRECISION_METHODS:
        raise ValueError(f"prior_precision must be None, a positive number or one of "
                         f"{', '.join(PRIOR_PRECISION_METHODS)}, got {prior_precision!r}")
    if isinstance(prior_precision, (int, float)) and not (0 < float(prior_precision) < float("inf")):
        raise ValueError(f"prior_precision must be positive and finite, got {prior_precision}")
    factors = fit_kfac(model, train, config, progress=progress, generator=generator)
    fitted = LaplaceGuide(model, blocks_from_factors(model, factors), 1.0)
    lml = tune_prior_precision(fitted, prior_precision, log_likelihood=factors.log_likelihood, layerwise=layerwise,
                               validation=validation, batch_size=glm_batch_size or config.batch_size,
                               max_tokens=glm_max_tokens,
                               progress=progress)
    return LaplaceFit(fitted, factors, lml)


def tune_prior_precision(guide: LaplaceGuide, prior_precision: str | float | None, *, log_likelihood: float,
                         layerwise: bool = False, validation: EncodedDataset | None = None, batch_size: int = 4,
                         max_tokens: int | None = GLM_MAX_TOKENS, progress: bool = False) -> float:
    """Set a fitted guide's prior precision as :func:`fit_laplace` does (the model's prior, a number,
    or a method of :func:`optimize_prior_precision` started from the prior's value) and return the
    log evidence. The curvature is not touched, so one K-FAC pass serves several choices of
    ``lambda``."""
    try:
        guide.set_prior_precision(prior_precision_of(guide.model))
    except ValueError:
        if prior_precision is None:
            raise
        guide.set_prior_precision(1.0)
    if isinstance(prior_precision, str):
        optimize_prior_precision(guide, prior_precision, log_likelihood=log_likelihood, validation=validation,
                                 layerwise=layerwise, batch_size=batch_size, max_tokens=max_tokens,
                                 progress=progress)
    elif prior_precision is not None:
        guide.set_prior_precision(float(prior_precision))
    return float(guide.log_marginal_likelihood(log_likelihood))
