"""IVON as a guide: a mean-field Gaussian over the LoRA sites whose scales come from its optimiser's
curvature estimate (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks";
Cong et al. 2024, IVON on LoRA).

For every site entry, with ``lambda`` the effective sample size (``ess``, by default the training
set's size ``N``: the untempered posterior) and ``delta = 1 / (lambda sigma_p^2)`` the Gaussian
prior's precision per effective example::

    q(A) = N(M, sigma^2),   sigma = 1 / sqrt(lambda (h + delta))

``h`` is the optimiser's running estimate of the per-example loss's Hessian diagonal, not a
parameter trained by a gradient. One step (:class:`IVONOptimizer`), from one weight sample per
step as any guide of this library draws (Flipout included: every example its own perturbation):

    g   = dL/dM                                   the mean NLL's gradient at the sample
    f   = (dL/dsigma) / sigma                     the reparametrisation estimate of diag(Hessian):
                                                  E[g(M + sigma e) e] / sigma = E[Hessian]
    m  <- b1 m + (1 - b1) g
    h  <- b2 h + (1 - b2) f + (1 - b2)^2 (h - f)^2 / (2 (h + delta))
    M  <- M - lr clip((m / (1 - b1^t) + delta M) / (h + delta), radius)
    sigma <- 1 / sqrt(lambda (h + delta))

which is IVON's update (the ``ivon-opt`` package's, checked against it in the tests) with its
noise-times-gradient estimate read from the scale's gradient. The prior enters as IVON's weight
decay ``delta``, so the trainer leaves the ELBO's KL term out of the loss for this guide
(:class:`~pyro_llm.guides.roles.OwnsOptimizer`): the loss is the mean NLL, as in IVON.

The parameters are BLoB's flat ``M`` and ``G`` (``sigma = G^2``), so saving, loading, Flipout,
the N-sample predictive and the scale summaries are :class:`~pyro_llm.guides.BLoBGuide`'s.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_real
from ..models.model import BayesianLoRAModel
from ..priors import gaussian_precision
from .blob import BLoBGuide

__all__ = ["IVON_BETA2", "IVON_HESS_INIT", "IVONGuide", "IVONOptimizer"]

#: The initial Hessian estimate and its momentum: IVON's LoRA recipe starts ``h`` at ``3e-4``-``1e-3``;
#: its ``beta2 = 0.99999`` suits ``10^4`` steps and more, a run of a few hundred steps needs ``h``
#: to follow its estimates within them
IVON_HESS_INIT = 1e-3
IVON_BETA2 = 0.99


def _root_scale(hess: torch.Tensor, ess: float, weight_decay: float) -> torch.Tensor:
    """``G = sqrt(sigma)`` with ``sigma = 1 / sqrt(ess (h + delta))``."""
    return (ess * (hess + weight_decay)).rsqrt().sqrt()


class IVONOptimizer(torch.optim.Optimizer):
    """IVON's update of a mean ``M`` and the root ``G`` of its scale (``sigma = G^2``): the module
    docstring's step, reading ``g`` from ``M.grad`` and ``f`` from ``G.grad``; ``G`` is then set
    from the new ``h``. State per ``M``: ``momentum``, ``hess`` and ``step`` (saved with the
    optimiser's ``state_dict``).

    :param lr: the learning rate (scaled by ``hess_init + delta`` when ``rescale_lr``, as IVON does,
        so that it reads as an SGD rate at the start).
    """

    def __init__(self, loc: torch.Tensor, root_scale: torch.Tensor, *, lr: float, ess: float, hess_init: float,
                 weight_decay: float, beta1: float = 0.9, beta2: float = 0.99999, clip_radius: float = math.inf,
                 rescale_lr: bool = True) -> None:
        check_real("lr", lr, low=0)
        check_real("ess", ess, low=0, low_open=True)
        check_real("hess_init", hess_init, low=0, low_open=True)
        check_real("weight_decay", weight_decay, low=0)
        check_real("beta1", beta1, low=0, high=1)
        check_real("beta2", beta2, low=0, high=1)
        if not (isinstance(clip_radius, (int, float)) and clip_radius > 0):  # inf: no clipping
            raise ValueError(f"clip_radius must be a positive number (inf: no clipping), got {clip_radius!r}")
        if loc.shape != root_scale.shape:
            raise ValueError(f"IVON's mean and scale must have one shape, got {tuple(loc.shape)} and "
                             f"{tuple(root_scale.shape)}")
        super().__init__([{"params": [loc, root_scale]}],
                         {"lr": lr, "ess": ess, "hess_init": hess_init, "weight_decay": weight_decay, "beta1": beta1,
                          "beta2": beta2, "clip_radius": clip_radius, "rescale_lr": rescale_lr})

    def hessian(self) -> torch.Tensor:
        """The current estimate ``h`` (``hess_init`` before the first step)."""
        group = self.param_groups[0]
        loc = group["params"][0]
        state = self.state.get(loc, {})
        return state["hess"] if "hess" in state else torch.full_like(loc, group["hess_init"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("IVONOptimizer takes no closure: the trainer computes the gradients")
        group = self.param_groups[0]
        loc, root = group["params"]
        if loc.grad is None or root.grad is None:
            raise RuntimeError("IVON needs the gradients of both its mean and its scale (one loss through a weight "
                               "sample drawn from the guide)")
        state = self.state[loc]
        if not state:
            state["step"] = 0
            state["momentum"] = torch.zeros_like(loc)
            state["hess"] = torch.full_like(loc, group["hess_init"])
        b1, b2, wd = group["beta1"], group["beta2"], group["weight_decay"]
        hess, momentum = state["hess"], state["momentum"]
        sigma = root.square()
        f = root.grad / (2.0 * root) / sigma  # (dL/dsigma) / sigma, through sigma = G^2
        state["step"] += 1
        momentum.mul_(b1).add_(loc.grad, alpha=1.0 - b1)
        new_hess = b2 * hess + (1.0 - b2) * f + 0.5 * (1.0 - b2) ** 2 * (hess - f).square() / (hess + wd)
        hess.copy_(new_hess)
        lr = group["lr"] * (group["hess_init"] + wd) if group["rescale_lr"] else group["lr"]
        debias = 1.0 - b1 ** state["step"]
        direction = ((momentum / debias + wd * loc) / (hess + wd)).clamp(-group["clip_radius"], group["clip_radius"])
        loc.sub_(lr * direction)
        root.copy_(_root_scale(hess, group["ess"], wd))


class IVONGuide(BLoBGuide):
    """The module docstring's guide: BLoB's mean-field family, its scales set by
    :class:`IVONOptimizer`.

    :param model: the :class:`BayesianLoRAModel` (with a zero-mean Gaussian prior, whose precision
        is IVON's weight decay, and its ``dataset_size`` set when ``ess`` is not given).
    :param ess: the effective sample size ``lambda`` (default: ``model.dataset_size``, the posterior
        itself; larger values temper it, as IVON's LoRA recipe does with ``1e6``-``1e7``).
    :param hess_init: the initial ``h``; ``sigma`` starts at ``1 / sqrt(lambda (hess_init + delta))``.
    :param beta1: the gradient's momentum; ``beta2``: the Hessian estimate's (``1 - beta2`` is the
        weight of each step's estimate: ``0.99999`` follows ``h`` over ``10^5`` steps, a short run
        needs a smaller value).
    :param clip_radius: bound on each entry's preconditioned step (before the learning rate).
    :param rescale_lr: multiply the learning rate by ``hess_init + delta`` (IVON's default).
    """

    def __init__(self, model: BayesianLoRAModel, ess: float | None = None, hess_init: float = IVON_HESS_INIT,
                 beta1: float = 0.9, beta2: float = IVON_BETA2, clip_radius: float = math.inf,
                 rescale_lr: bool = True, prefix: str = "ivon") -> None:
        super().__init__(model, prefix=prefix)
        check_real("ess", ess, low=0, low_open=True, optional=True)
        self._ess = None if ess is None else float(ess)
        self._prior_precision = gaussian_precision(model.prior, "IVON (its weight decay is the prior's precision)")
        self.hess_init, self.beta1, self.beta2 = hess_init, beta1, beta2
        self.clip_radius, self.rescale_lr = clip_radius, rescale_lr

    @property
    def ess(self) -> float:
        """The effective sample size: the one given, else the model's ``dataset_size`` (needed to
        start and to train the guide, not to load a trained one)."""
        ess = self._ess if self._ess is not None else self.model.dataset_size
        if ess is None:
            raise ValueError("IVONGuide needs the effective sample size: pass ess, or build the model with its "
                             "dataset_size")
        return float(ess)

    @property
    def weight_decay(self) -> float:
        """``delta``: the prior's precision per effective example."""
        return self._prior_precision / self.ess

    def _init_G(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """``sigma = 1 / sqrt(ess (hess_init + delta))``; without an effective sample size (a trained
        guide being rebuilt, whose saved ``G`` replaces this) the prior's scale, every tempered IVON
        posterior's bound."""
        if self._ess is None and self.model.dataset_size is None:
            return torch.full(shape, self._prior_precision ** -0.25, device=device)
        return _root_scale(torch.full(shape, self.hess_init, device=device), self.ess, self.weight_decay)

    def make_optimizer(self, lr: float) -> IVONOptimizer:
        """The optimiser of ``M`` and ``G`` (:class:`~pyro_llm.guides.roles.OwnsOptimizer`)."""
        M, G = self.flat_params()
        return IVONOptimizer(M, G, lr=lr, ess=self.ess, hess_init=self.hess_init, weight_decay=self.weight_decay,
                             beta1=self.beta1, beta2=self.beta2, clip_radius=self.clip_radius,
                             rescale_lr=self.rescale_lr)
