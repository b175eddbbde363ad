"""The mean-field ELBO without the log-densities it never reads.

``pyro.infer.TraceMeanField_ELBO`` uses the closed-form ``KL(q || p)`` of every latent site that
has one, but its trace preparation (``get_importance_trace``) first evaluates ``log p`` and
``log q`` of *every* site. With one site per LoRA matrix (60 for SmolLM2 with q/v targets) those
unused log-densities are a measurable share of a BLoB step's overhead over plain LoRA.
:class:`MeanFieldELBO` is the same estimator, term for term, computing log-densities only for
observed sites and for latent sites whose KL has no closed form (Student-t priors, say). If the
closed-form check is ever wrong for an exotic distribution, the loss falls back to computing every
log-density, so the result never changes. ``tests/test_elbo.py`` checks loss and gradients
against ``TraceMeanField_ELBO``.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch.distributions.kl import _dispatch_kl

__all__ = ["MeanFieldELBO", "has_closed_form_kl"]


def _unwrap(q: Any, p: Any) -> tuple[type, type] | None:
    while isinstance(q, Independent) or isinstance(p, Independent):
        if not (isinstance(q, Independent) and isinstance(p, Independent)):
            return None
        if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
            return None
        q, p = q.base_dist, p.base_dist
    return type(q), type(p)


def has_closed_form_kl(q: Any, p: Any) -> bool:
    """Whether ``kl_divergence(q, p)`` has a registered closed form (after matching ``Independent``
    wrappers); ``False`` when unsure, which only costs a log-density evaluation."""
    types = _unwrap(q, p)
    return types is not None and _dispatch_kl(*types) is not NotImplemented


class MeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that evaluates log-densities only where its loss uses them."""

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):  # GuideMessenger: Pyro's path
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        sampled = set()  # latent sites whose KL is estimated from log-densities
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                if not has_closed_form_kl(guide_trace.nodes[name]["fn"], site["fn"]):
                    sampled.add(name)
        model_trace.compute_log_prob(lambda name, site: site["is_observed"] or name in sampled)
        needed = sampled | {n for n, s in guide_trace.nodes.items()
                            if s["type"] == "sample" and n not in model_trace.nodes}  # auxiliary sites
        if needed:
            # score parts of just these guide sites, written into the very site dicts of the trace
            sub = Trace(graph_type="flat")
            sub.nodes.update((n, guide_trace.nodes[n]) for n in needed)
            sub.compute_score_parts()
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace: Any, guide_trace: Any) -> tuple[float, torch.Tensor]:
        try:
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        except KeyError:  # a closed form was expected but not found: evaluate everything, as Pyro does
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
            return super()._differentiable_loss_particle(model_trace, guide_trace)
