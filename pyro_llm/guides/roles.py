"""Parameter roles: which of a guide's parameters are locations and which are scales.

Optimisers treat the two differently (BLoB trains its ``G`` with its own optimiser and rate), and
the trainer must learn which is which without matching names. A guide declares its roles with
:class:`DeclaresParamGroups`::

    class MyGuide:
        def param_groups(self) -> dict[str, list[torch.Tensor]]:
            return {"scale": [my_log_scale_tensor]}

The tensors are the unconstrained ones Pyro's parameter store holds (``pyro.param`` of a real
parameter returns that very tensor). Pyro's own autoguides declare nothing; :func:`param_roles`
knows their structure by type (``AutoNormal.scales``, the ``scale``/``cov_factor``/``scale_tril``
of the joint Gaussians, an ``AutoGuideList``'s parts, a custom
guide among them through the ``AutoCallable`` Pyro wraps it in). Every parameter not declared a scale is a
location.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import torch
from pyro.infer.autoguide import (AutoCallable, AutoDiagonalNormal, AutoGuideList, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)

__all__ = ["DeclaresParamGroups", "LOC", "OwnsOptimizer", "SCALE", "declared_param_groups", "param_roles"]

SCALE, LOC = "scale", "loc"


@runtime_checkable
class DeclaresParamGroups(Protocol):
    """A guide that says which of its parameters play which role (``"scale"``; the rest are locations)."""

    def param_groups(self) -> Mapping[str, Iterable[torch.Tensor]]: ...


@runtime_checkable
class OwnsOptimizer(Protocol):
    """A guide whose parameters its own optimiser updates, the prior entering through that update
    (IVON, :class:`~pyro_llm.guides.IVONGuide`: the scales come from the optimiser's curvature
    estimate and the prior is its weight decay). The trainer gives that optimiser the guide's
    parameters at the run's learning rate and schedule, trains any others (``B`` as a parameter)
    as usual, and leaves the ELBO's KL term out of the loss: the loss is the mean NLL."""

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer: ...


def _autoguide_scales(guide: Any) -> list[torch.Tensor]:
    if isinstance(guide, AutoGuideList):
        return [t for part in guide for t in declared_param_groups(part).get(SCALE, [])]
    if isinstance(guide, AutoCallable):  # how AutoGuideList.append holds a guide that is not an AutoGuide
        return declared_param_groups(guide._guide).get(SCALE, [])
    if isinstance(guide, AutoNormal):
        return list(guide.scales.parameters())
    own = dict(guide.named_parameters(recurse=False)) if isinstance(guide, torch.nn.Module) else {}
    if isinstance(guide, AutoLowRankMultivariateNormal):
        return [own[k] for k in ("scale_unconstrained", "cov_factor") if k in own]
    if isinstance(guide, AutoMultivariateNormal):
        return [own[k] for k in ("scale_tril_unconstrained", "scale_unconstrained") if k in own]
    if isinstance(guide, AutoDiagonalNormal):
        return [own[k] for k in ("scale_unconstrained",) if k in own]
    return []


def declared_param_groups(guide: Any) -> dict[str, list[torch.Tensor]]:
    if isinstance(guide, DeclaresParamGroups):
        return {role: list(ts) for role, ts in guide.param_groups().items()}
    return {SCALE: _autoguide_scales(guide)}


def param_roles(guide: Any, params: Iterable[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """``params`` (the tensors a training step touches) split by role: ``{"loc": [...], "scale": [...]}``
    in their given order. Tensors the guide declares but the step does not touch are left out."""
    scales = {id(t) for t in declared_param_groups(guide).get(SCALE, [])}
    roles: dict[str, list[torch.Tensor]] = {LOC: [], SCALE: []}
    for p in params:
        roles[SCALE if id(p) in scales else LOC].append(p)
    return roles
