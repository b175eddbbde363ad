"""Guides by name (the CLI's ``--guide``) and the generic operations every guide supports."""

from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal

from ..models.model import BayesianLoRAModel
from .blob import BLoBGuide

__all__ = ["GUIDES", "make_guide", "guide_median", "guide_sample"]


def _map(model: BayesianLoRAModel, **_: Any) -> AutoDelta:
    return AutoDelta(model, init_loc_fn=model.init_loc_fn())


def _normal(model: BayesianLoRAModel, init_scale: float = 0.01, **_: Any) -> AutoNormal:
    return AutoNormal(model, init_loc_fn=model.init_loc_fn(), init_scale=init_scale)


def _blob(model: BayesianLoRAModel, eps: float = 0.05, sigma_param: str = "square", **_: Any) -> BLoBGuide:
    return BLoBGuide(model, eps=eps, sigma_param=sigma_param)


#: ``map``: Pyro's ``AutoDelta`` (MAP; a Gaussian prior is weight decay); ``normal``: Pyro's
#: ``AutoNormal`` (mean-field, softplus scales); ``blob``: :class:`BLoBGuide`.
GUIDES: dict[str, Callable[..., Any]] = {"map": _map, "normal": _normal, "blob": _blob}


def make_guide(name: str, model: BayesianLoRAModel, **options: Any) -> Any:
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {', '.join(GUIDES)}")
    return GUIDES[name](model, **options)


def guide_median(guide: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The guide's point estimate of each site (posterior mean for Gaussian guides)."""
    with torch.no_grad():
        values = guide.median(**batch)
    return {k: v.detach() for k, v in values.items()}


def guide_sample(guide: Any, batch: dict[str, torch.Tensor], sites: list[str]) -> dict[str, torch.Tensor]:
    """One joint draw of ``sites`` from the guide."""
    with torch.no_grad(), poutine.block(hide_types=["param"]):
        trace = poutine.trace(guide).get_trace(**batch)
    return {name: trace.nodes[name]["value"].detach() for name in sites}

