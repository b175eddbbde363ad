"""The operations every guide supports: its point estimate, one joint draw, the estimate written back."""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine

from ..models.model import BayesianLoRAModel

__all__ = ["guide_median", "guide_sample", "write_back_means"]


def guide_median(guide: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The guide's point estimate of each site (posterior mean for Gaussian guides)."""
    with torch.no_grad():
        values = guide.median(**batch)
    return {k: v.detach() for k, v in values.items()}


def write_back_means(model: BayesianLoRAModel, guide: Any, batch: dict[str, torch.Tensor]) -> None:
    """Store the guide's point estimate in the site modules (what peft saves as the adapter, and
    the point a Laplace fit expands around)."""
    with torch.no_grad():
        for name, value in guide_median(guide, batch).items():
            if name in model.site_names:
                weight = model.site(name).module.weight
                weight.copy_(value.to(weight.dtype))


def guide_sample(guide: Any, batch: dict[str, torch.Tensor], sites: list[str]) -> dict[str, torch.Tensor]:
    """One joint draw of ``sites`` from the guide."""
    with torch.no_grad(), poutine.block(hide_types=["param"]):
        trace = poutine.trace(guide).get_trace(**batch)
    return {name: trace.nodes[name]["value"].detach() for name in sites}

