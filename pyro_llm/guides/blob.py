"""BLoB's variational family over the LoRA sites (Wang et al. 2024, ``algorithms.md`` §1).

For every site (the ``A`` matrices; ``B`` too when the model makes it a site)::

    q(A) = N(M, diag(sigma^2)),   sigma = G^2 (BLoB's parametrisation) or softplus(G)
    M    initialised as LoRA initialises A (the model's point value, Kaiming-uniform)
    G    ~ U(eps / sqrt(2), eps), eps = 0.05, so sigma_0 in [0.00125, 0.0025]

``B`` stays a deterministic ``pyro.param`` of the model, zero at the start, so the model equals
the base model at step 0. A hierarchical prior's own latent sites (a sampled prior scale) get a
guide of their own, Pyro's ``AutoNormal`` by default (``hyper_guide``), built over
:meth:`~pyro_llm.models.BayesianLoRAModel.sample_prior_hyperparameters` and run first. The guide is an ordinary Pyro guide: it registers ``pyro.param`` s
``<site>.M`` and ``<site>.G`` and samples each site from a ``Normal`` with the site's event
shape, so ``TraceMeanField_ELBO`` uses the closed-form KL when the prior has one and a sampled
estimate otherwise; ``Trace_ELBO`` and ``Predictive`` work as with any guide. Flipout is not
part of the guide: wrap inference in :func:`pyro_llm.poutine.flipout`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro.infer.autoguide import AutoNormal

from ..models.model import BayesianLoRAModel
from .roles import SCALE, declared_param_groups

__all__ = ["BLoBGuide"]


class BLoBGuide:
    """Mean-field Gaussian guide with BLoB's ``sigma = G^2`` parametrisation.

    :param model: the :class:`BayesianLoRAModel` whose sites it covers.
    :param eps: initial ``G`` is uniform on ``[eps / sqrt(2), eps]``.
    :param sigma_param: ``"square"`` (``sigma = G^2``, BLoB) or ``"softplus"``.
    :param hyper_guide: ``guide_factory(hyper_model) -> guide`` for the prior's own latent sites, if
        it has any (default: ``AutoNormal``; ``AutoDelta`` gives type-II MAP hyper-parameters).
    """

    def __init__(self, model: BayesianLoRAModel, eps: float = 0.05, sigma_param: str = "square",
                 hyper_guide: Callable[[Callable[..., Any]], Any] = AutoNormal) -> None:
        if sigma_param not in ("square", "softplus"):
            raise ValueError(f"sigma_param must be 'square' or 'softplus', got {sigma_param!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.model = model
        self.eps = eps
        self.sigma_param = sigma_param
        self._hyper_factory = hyper_guide
        self._hyper: Any = None
        self._hyper_checked = False

    @property
    def hyper(self) -> Any:
        """The guide of the prior's latent sites, or ``None`` when the prior samples none."""
        if not self._hyper_checked:
            self._hyper_checked = True
            if self.model.hyper_site_names():
                self._hyper = self._hyper_factory(self.model.sample_prior_hyperparameters)
        return self._hyper

    def _init_G(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        lo, hi = self.eps / math.sqrt(2.0), self.eps
        g = torch.empty(shape, device=device).uniform_(lo, hi)
        if self.sigma_param == "softplus":  # same initial sigma range as the squared form
            sigma = g ** 2
            g = sigma + torch.log(-torch.expm1(-sigma))  # softplus^{-1}
        return g

    def sigma(self, G: torch.Tensor) -> torch.Tensor:
        return G ** 2 if self.sigma_param == "square" else F.softplus(G)

    def params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, G)`` of a site, created on first use."""
        site = self.model.site(name)
        w = site.module.weight
        M = pyro.param(f"{name}.M", lambda: w.detach().float().clone())
        G = pyro.param(f"{name}.G", lambda: self._init_G(w.shape, w.device))
        return M, G

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = dict(self.hyper()) if self.hyper is not None else {}
        for site in self.model.sites:
            M, G = self.params(site.name)
            out[site.name] = pyro.sample(site.name, dist.Normal(M, self.sigma(G)).to_event(M.dim()))
        return out

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The posterior means ``M`` (BLoB's ``N = 0`` prediction)."""
        return {s.name: self.params(s.name)[0].detach() for s in self.model.sites}

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """The ``G``'s are scales (:mod:`pyro_llm.guides.roles`); ``M`` and the hyper-guide's own
        parameters follow its declaration."""
        store = dict(pyro.get_param_store().named_parameters())
        scales = [store[f"{s.name}.G"] for s in self.model.sites if f"{s.name}.G" in store]
        if self.hyper is not None:
            scales += declared_param_groups(self.hyper).get(SCALE, [])
        return {SCALE: scales}

    def scales(self) -> dict[str, torch.Tensor]:
        return {s.name: self.sigma(self.params(s.name)[1]).detach() for s in self.model.sites}
