"""Prior objects: from a site's (name, module, shape) to a Pyro distribution.

A prior is anything with ``prior_dist(name, module, shape) -> Distribution`` whose event shape is
``shape``. :func:`as_prior` also accepts a plain distribution (expanded to every site), a
mapping from site name (or a regex over names) to priors, or a callable with the same signature
as ``prior_dist``. Swapping the prior is passing another object; the model never changes.

Usage::

    model = BayesianLoRAModel(peft_model, head, prior=GaussianPrior(0.2))
    model = BayesianLoRAModel(peft_model, head, prior=StudentTPrior(df=3.0, scale=0.1))
    model = BayesianLoRAModel(peft_model, head, prior={r".*v_proj.*": LaplacePrior(0.1),
                                                      r".*": GaussianPrior(0.2)})
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Protocol, Union, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .checks import check_real

#: BLoB's and Laplace-LoRA's prior standard deviation of every LoRA entry, the library's default prior
DEFAULT_PRIOR_STD = 0.2

__all__ = ["DEFAULT_PRIOR_STD", "Prior", "IIDPrior", "GaussianPrior", "gaussian_precision", "HierarchicalGaussianPrior", "LaplacePrior", "StudentTPrior",
           "SitePrior", "as_prior", "iid_over"]


@runtime_checkable
class Prior(Protocol):
    """The prior interface."""

    def prior_dist(self, name: str, module: nn.Module, shape: torch.Size) -> dist.TorchDistribution: ...


class IIDPrior:
    """Every entry of every site i.i.d. from a scalar distribution ``base`` (moved to the site's
    device and dtype)."""

    def __init__(self, base: dist.TorchDistribution) -> None:
        if base.event_shape != torch.Size():
            raise ValueError(f"IIDPrior needs a scalar distribution, got event shape {tuple(base.event_shape)}")
        self.base = base
        self._cache: dict[tuple[torch.device, torch.Size], dist.TorchDistribution] = {}

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self.base, k) for k in self.base.arg_constraints if hasattr(self.base, k)}

    def prior_dist(self, name: str, module: nn.Module, shape: torch.Size) -> dist.TorchDistribution:
        # built once per (device, shape) and reused: the model asks for every site's prior at
        # every step, and distributions are immutable
        ref = next(iter(module.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        key = (device, torch.Size(shape))
        cached = self._cache.get(key)
        if cached is None:
            params = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in self._params().items()}
            cached = type(self.base)(**params).expand(shape).to_event(len(shape))
            self._cache[key] = cached
        return cached

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={float(v):g}" for k, v in self._params().items() if torch.as_tensor(v).numel() == 1)
        return f"{type(self).__name__}({args})"


class GaussianPrior(IIDPrior):
    """``N(0, std^2)`` on every entry (BLoB's default ``std = 0.2``). A MAP fit with it is weight
    decay with coefficient ``1 / (2 std^2 N)`` per example; the KL to a Normal guide is closed form."""

    def __init__(self, std: float = DEFAULT_PRIOR_STD, loc: float = 0.0) -> None:
        check_real("prior std", std, low=0, low_open=True)
        check_real("prior loc", loc)
        super().__init__(dist.Normal(torch.tensor(float(loc)), torch.tensor(float(std))))
        self.std = std


class LaplacePrior(IIDPrior):
    """``Laplace(0, scale)`` on every entry (sparsity-promoting; the KL is estimated by sampling)."""

    def __init__(self, scale: float = 0.1, loc: float = 0.0) -> None:
        check_real("prior scale", scale, low=0, low_open=True)
        check_real("prior loc", loc)
        super().__init__(dist.Laplace(torch.tensor(float(loc)), torch.tensor(float(scale))))


class StudentTPrior(IIDPrior):
    """Student-t with ``df`` degrees of freedom (heavy tails; the KL is estimated by sampling)."""

    def __init__(self, df: float = 3.0, scale: float = 0.1, loc: float = 0.0) -> None:
        check_real("Student-t df", df, low=0, low_open=True)
        check_real("prior scale", scale, low=0, low_open=True)
        check_real("prior loc", loc)
        super().__init__(dist.StudentT(torch.tensor(float(df)), torch.tensor(float(loc)), torch.tensor(float(scale))))


def iid_over(base: dist.TorchDistribution, shape: torch.Size) -> dist.TorchDistribution:
    """``base`` i.i.d. over every entry of a site of ``shape``, as a distribution of event shape
    ``shape``. ``base``'s parameters may carry batch dimensions that a hyper-parameter drawn inside
    a vectorised plate gives them (``Predictive(..., parallel=True)`` draws ``tau`` with shape
    ``(S, 1)``): they stay batch dimensions, in front of the site's. ``Normal(0, tau).expand(shape)``
    would instead try to broadcast ``(S, 1)`` against the site's rows and fail."""
    shape = torch.Size(shape)
    batch = base.batch_shape
    params = {k: getattr(base, k) for k in base.arg_constraints if hasattr(base, k)}
    widened = {k: torch.as_tensor(v).expand(batch).reshape(batch + (1,) * len(shape)) for k, v in params.items()}
    return type(base)(**widened).expand(batch + shape).to_event(len(shape))


class HierarchicalGaussianPrior:
    """``A_site ~ N(0, tau_site^2)`` entry-wise with a per-site scale ``tau_site ~ HalfCauchy(scale)``,
    a latent site named ``<site>_tau`` (``BLoBGuide`` guides it with an ``AutoNormal``): the prior's
    scale is learnt per site instead of fixed. Safe under vectorised sampling (:func:`iid_over`)."""

    def __init__(self, scale: float = DEFAULT_PRIOR_STD) -> None:
        check_real("prior scale", scale, low=0, low_open=True)
        self.scale = float(scale)

    def prior_dist(self, name: str, module: nn.Module, shape: torch.Size) -> dist.TorchDistribution:
        ref = next(iter(module.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        tau = pyro.sample(f"{name}_tau", dist.HalfCauchy(torch.tensor(self.scale, device=device)))
        return iid_over(dist.Normal(torch.zeros_like(tau), tau), shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:g})"


class SitePrior:
    """Per-site priors: the first pattern (a regex, matched with ``re.fullmatch``, or an exact
    site name) that matches a site's name wins; ``default`` covers the rest."""

    def __init__(self, priors: Mapping[str, Any], default: Any | None = None) -> None:
        self.rules = [(re.compile(re.escape(k) if not _is_regex(k) else k), as_prior(v)) for k, v in priors.items()]
        self.default = as_prior(default) if default is not None else None

    def prior_dist(self, name: str, module: nn.Module, shape: torch.Size) -> dist.TorchDistribution:
        for pattern, prior in self.rules:
            if pattern.fullmatch(name):
                return prior.prior_dist(name, module, shape)
        if self.default is None:
            raise KeyError(f"no prior matches site {name!r} and no default was given")
        return self.default.prior_dist(name, module, shape)


def _is_regex(key: str) -> bool:
    return any(ch in key for ch in "*+?[]()|^$\\")


class _CallablePrior:
    def __init__(self, fn: Callable[[str, nn.Module, torch.Size], dist.TorchDistribution]) -> None:
        self.fn = fn

    def prior_dist(self, name: str, module: nn.Module, shape: torch.Size) -> dist.TorchDistribution:
        return self.fn(name, module, shape)


PriorLike = Union[Prior, dist.TorchDistribution, Mapping[str, Any], Callable[..., dist.TorchDistribution], None]


def as_prior(prior: PriorLike) -> Prior:
    """Normalise anything prior-like to a :class:`Prior` (``None``: :class:`GaussianPrior` with its
    default std)."""
    if prior is None:
        return GaussianPrior()
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, dist.TorchDistribution):
        return IIDPrior(prior)
    if isinstance(prior, Mapping):
        return SitePrior(prior)
    if callable(prior):
        return _CallablePrior(prior)
    raise TypeError(f"cannot use {prior!r} as a prior")


__all__ += ["PriorLike"]


def gaussian_precision(prior: Any, purpose: str) -> float:
    """``1 / sigma^2`` of ``prior`` when it is one zero-mean Gaussian for every entry of every site
    (:class:`GaussianPrior`, or an :class:`IIDPrior` of a scalar ``Normal(0, sigma)``), which
    ``purpose`` (a sentence's subject, e.g. "the Laplace approximation") needs; a clear error otherwise."""
    base = getattr(prior, "base", None)
    if isinstance(prior, IIDPrior) and isinstance(base, torch.distributions.Normal) and base.loc.numel() == 1 \
            and float(base.loc) == 0.0 and base.scale.numel() == 1:
        return float(1.0 / base.scale ** 2)
    raise ValueError(f"{purpose} needs a zero-mean i.i.d. Gaussian prior to read its precision from, and the "
                     f"model's prior is {prior!r}")
