"""The operations every guide supports: its point estimate, one joint draw, the estimate written back."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from pyro import poutine
from torch.distributions import biject_to
from pyro.infer.autoguide import AutoCallable, AutoGuideList, AutoLaplaceApproximation, AutoNormal

from ..models.model import BayesianLoRAModel

__all__ = ["ReportsScales", "guide_median", "guide_sample", "guide_scales", "scale_summary", "write_back_means"]


@runtime_checkable
class ReportsScales(Protocol):
    """A guide that can say how uncertain it is about each site: its posterior standard deviations."""

    def scales(self) -> dict[str, torch.Tensor]: ...


def guide_median(guide: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The guide's point estimate of each site (posterior mean for Gaussian guides; for Pyro's
    ``AutoLaplaceApproximation``, whose ``median`` is not implemented before its Hessian is taken,
    the MAP it trains: its latent ``loc`` unpacked per site and constrained). The parts of an
    ``AutoGuideList`` answer for their sites, a custom part through the ``AutoCallable`` Pyro wraps
    it in (whose own ``median`` knows nothing)."""
    if isinstance(guide, AutoGuideList):
        return {k: v for part in guide for k, v in guide_median(part, batch).items()}
    if isinstance(guide, AutoCallable) and hasattr(guide._guide, "median"):
        return guide_median(guide._guide, batch)
    with torch.no_grad():
        if isinstance(guide, AutoLaplaceApproximation):
            if guide.prototype_trace is None:
                guide._setup_prototype(**batch)
            # AutoContinuous's own unpacking of its latent vector (the site layout it built)
            return {site["name"]: biject_to(site["fn"].support)(value).detach()
                    for site, value in guide._unpack_latent(guide.loc)}
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



def guide_scales(guide: Any) -> dict[str, torch.Tensor] | None:
    """Every site's posterior standard deviations: a guide's own :meth:`ReportsScales.scales`, or
    Pyro's ``AutoNormal``'s (whose ``scales`` attribute is a module of unconstrained parameters,
    not that method); ``None`` for a guide that reports none."""
    if isinstance(guide, AutoNormal):
        if guide.prototype_trace is None:
            return None
        names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
        with torch.no_grad():
            return {name: guide._get_loc_and_scale(name)[1].detach() for name in names}
    if isinstance(guide, ReportsScales) and not isinstance(guide.scales, torch.nn.Module):
        return guide.scales()
    return None


def scale_summary(guide: Any) -> dict[str, dict[str, float]] | None:
    """Per site, and over all sites, the mean, median, minimum and maximum of the guide's posterior
    standard deviations (``None`` for a guide that does not report them, :class:`ReportsScales`):
    where a Bayesian LoRA is uncertain, and whether its scales left their initialisation."""
    scales = guide_scales(guide)
    if scales is None:
        return None

    def stats(t: torch.Tensor) -> dict[str, float]:
        t = t.detach().double().flatten().cpu()
        return {"mean": float(t.mean()), "median": float(t.median()), "min": float(t.min()), "max": float(t.max())}

    out = {name: stats(s) for name, s in scales.items()}
    out["all sites"] = stats(torch.cat([s.flatten() for s in scales.values()]))
    return out
