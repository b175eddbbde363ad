"""BLoB's variational family over the LoRA sites (Wang et al. 2024, ``algorithms.md`` §1).

For every site (the ``A`` matrices; ``B`` too when the model makes it a site)::

    q(A) = N(M, diag(sigma^2)),   sigma = G^2 (BLoB's parametrisation) or softplus(G)
    M    initialised as LoRA initialises A (the model's point value, Kaiming-uniform)
    G    ~ U(eps / sqrt(2), eps), eps = 0.05, so sigma_0 in [0.00125, 0.0025]

``B`` stays a deterministic ``pyro.param`` of the model, zero at the start, so the model equals
the base model at step 0. A hierarchical prior's own latent sites (a sampled prior scale) get a
guide of their own, Pyro's ``AutoNormal`` by default (``hyper_guide``), built over
:meth:`~pyro_llm.models.BayesianLoRAModel.sample_prior_hyperparameters` and run first.

The guide is an ordinary Pyro guide: every site is sampled from a ``Normal`` with the site's
event shape, so ``TraceMeanField_ELBO`` uses the closed-form KL when the prior has one and a
sampled estimate otherwise; ``Trace_ELBO`` and ``Predictive`` work as with any guide. Its
parameters are two flat ``pyro.param`` s, ``<prefix>.M`` and ``<prefix>.G`` (every site's
entries, in the model's site order), drawn from once per step for all sites
(:class:`~pyro_llm.distributions.FlatNormal`): the optimiser sees two tensors, a step draws
one noise tensor, and the mean-field ELBO computes one KL. :meth:`BLoBGuide.params` gives a
site's views. Flipout is not part of the guide: wrap inference in :func:`pyro_llm.poutine.flipout`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import torch
import torch.nn.functional as F

from pyro.infer.autoguide import AutoNormal

from ..distributions import FlatNormal
from ..models.model import BayesianLoRAModel
from .roles import SCALE, declared_param_groups

__all__ = ["BLOB_EPS", "BLoBGuide"]


#: The reference's initial range of ``G``: uniform on ``[eps / sqrt(2), eps]``
BLOB_EPS = 0.05


class BLoBGuide:
    """Mean-field Gaussian guide with BLoB's ``sigma = G^2`` parametrisation.

    :param model: the :class:`BayesianLoRAModel` whose sites it covers.
    :param eps: initial ``G`` is uniform on ``[eps / sqrt(2), eps]``.
    :param sigma_param: ``"square"`` (``sigma = G^2``, BLoB) or ``"softplus"``.
    :param hyper_guide: ``guide_factory(hyper_model) -> guide`` for the prior's own latent sites, if
        it has any (default: ``AutoNormal``; ``AutoDelta`` gives type-II MAP hyper-parameters).
    :param prefix: the names of its two parameters, ``<prefix>.M`` and ``<prefix>.G``.
    """

    def __init__(self, model: BayesianLoRAModel, eps: float = BLOB_EPS, sigma_param: str = "square",
                 hyper_guide: Callable[[Callable[..., Any]], Any] = AutoNormal, prefix: str = "blob") -> None:
        if sigma_param not in ("square", "softplus"):
            raise ValueError(f"sigma_param must be 'square' or 'softplus', got {sigma_param!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if prefix in model.site_names or any(n.startswith(f"{prefix}.") for n in model.site_names):
            raise ValueError(f"prefix {prefix!r} clashes with the model's site names")
        self.model = model
        self.prefix = prefix
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

    def flat_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat ``(M, G)`` of every site, created on first use."""
        sites = self.model.sites

        def init_M() -> torch.Tensor:
            return torch.cat([s.module.weight.detach().float().reshape(-1) for s in sites])

        M = pyro.param(f"{self.prefix}.M", init_M)
        G = pyro.param(f"{self.prefix}.G", lambda: self._init_G(M.shape, M.device))
        return M, G

    def params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, G)`` of one site: views of the flat parameters."""
        M, G = self.flat_params()
        return self._per_site(M)[name], self._per_site(G)[name]

    def upgrade_saved(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved parameters of the earlier per-site layout (``<site>.M``, ``<site>.G``) as the flat
        ``<prefix>.M``, ``<prefix>.G``; a file in the current layout is returned as it is."""
        names = self.model.site_names
        if f"{self.prefix}.M" in saved or not all(f"{n}.M" in saved and f"{n}.G" in saved for n in names):
            return saved
        out = {k: v for k, v in saved.items() if not any(k in (f"{n}.M", f"{n}.G") for n in names)}
        for part in ("M", "G"):
            out[f"{self.prefix}.{part}"] = torch.cat([saved[f"{n}.{part}"].reshape(-1) for n in names])
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = dict(self.hyper()) if self.hyper is not None else {}
        M, G = self.flat_params()
        q = FlatNormal(M, self.sigma(G), self.model.site_names, [s.shape for s in self.model.sites])
        for site in self.model.sites:
            out[site.name] = pyro.sample(site.name, q.site(site.name).to_event(len(site.shape)))
        return out

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The posterior means ``M`` (BLoB's ``N = 0`` prediction)."""
        return self._per_site(self.flat_params()[0].detach())

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """The ``G``'s are scales (:mod:`pyro_llm.guides.roles`); ``M`` and the hyper-guide's own
        parameters follow its declaration."""
        store = dict(pyro.get_param_store().named_parameters())
        scales = [store[f"{self.prefix}.G"]] if f"{self.prefix}.G" in store else []
        if self.hyper is not None:
            scales += declared_param_groups(self.hyper).get(SCALE, [])
        return {SCALE: scales}

    def scales(self) -> dict[str, torch.Tensor]:
        """Every site's ``sigma``."""
        return self._per_site(self.sigma(self.flat_params()[1]).detach())

    def _per_site(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        sites = self.model.sites
        return {s.name: p.view(s.shape) for s, p in zip(sites, flat.split([s.shape.numel() for s in sites]))}
