"""Scale the KL term of chosen latent sites: ``ELBO_w = E_q[log p(D|A)] - w * KL(q || p)``.

The handler multiplies the ``scale`` of the named (unobserved) sample sites in both model and
guide, and of the guide's auxiliary sites (``AutoNormal``'s ``<site>_unconstrained``, a low-rank
guide's joint latent), whose ``log q`` is part of the KL too; that is how Pyro's ELBOs weight a
site's KL (analytic in ``TraceMeanField_ELBO``, sampled in ``Trace_ELBO``). ``w = 1`` is the exact
ELBO; the schedules of :mod:`pyro_llm.infer.schedules` produce ``w`` per step.
"""

from __future__ import annotations

from typing import Iterable

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

__all__ = ["KLWeightMessenger", "kl_weight"]


class KLWeightMessenger(Messenger):
    """Multiply the scale of latent sites ``sites`` (all latent sites if ``None``) and of auxiliary
    guide sites by ``weight``."""

    def __init__(self, weight: float, sites: Iterable[str] | None = None) -> None:
        if not weight >= 0:
            raise ValueError(f"KL weight must be non-negative, got {weight}")
        super().__init__()
        self.weight = float(weight)
        self.sites = None if sites is None else frozenset(sites)

    def _pyro_sample(self, msg: Message) -> None:
        auxiliary = bool(msg["infer"].get("is_auxiliary"))
        if msg["is_observed"] and msg["name"] not in (self.sites or ()):
            return
        if self.sites is not None and msg["name"] not in self.sites and not auxiliary:
            return
        msg["scale"] = self.weight * msg["scale"]


def kl_weight(fn=None, weight: float = 1.0, sites: Iterable[str] | None = None):
    """KL-weight handler: a context manager, or a decorator when given ``fn``."""
    messenger = KLWeightMessenger(weight, sites)
    return messenger(fn) if fn is not None else messenger
