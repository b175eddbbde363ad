"""The mean-field ELBO without the log-densities it never reads.

``pyro.infer.TraceMeanField_ELBO`` uses the closed-form ``KL(q || p)`` of every latent site that
has one, but its trace preparation (``get_importance_trace``) first evaluates ``log p`` and
``log q`` of *every* site. With one site per LoRA matrix (60 for SmolLM2 with q/v targets) those
unused log-densities are a measurable share of a BLoB step's overhead over plain LoRA.
:class:`MeanFieldELBO` is the same estimator, term for term, computing log-densities only for
observed sites and for latent sites whose KL has no closed form (Student-t priors, say). If the
closed-form check is ever wrong for an exotic distribution, the loss falls back to computing every
log-density, so the result never changes.

The closed-form KLs of Normal guides against Normal priors (BLoB, ``AutoNormal`` with the default
Gaussian prior) are summed in one fused computation over all such sites with the same scale (and,
for i.i.d. priors, the same scalar parameters, which are then not copied) instead of one small
graph per site: the same sum, with a constant number of autograd nodes (and, for the i.i.d.
prior, no full-size temporaries: :mod:`pyro_llm.infer.normal_kl`).
``tests/test_elbo.py`` checks loss and gradients against ``TraceMeanField_ELBO``.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Independent, Normal
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch.distributions import Normal as TorchNormal, kl_divergence
from torch.distributions.kl import _dispatch_kl

from .normal_kl import iid_normal_kl_sum

__all__ = ["MeanFieldELBO", "has_closed_form_kl"]


def _unwrap(q: Any, p: Any) -> tuple[type, type] | None:
    while isinstance(q, Independent) or isinstance(p, Independent):
        if not (isinstance(q, Independent) and isinstance(p, Independent)):
            return None
        if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
            return None
        q, p = q.base_dist, p.base_dist
    return type(q), type(p)


def _normal_pair(q: Any, p: Any) -> tuple[Normal, Normal] | None:
    """``(q, p)`` base Normals when both are Normals made fully event-shaped by ``Independent``
    (the form of every LoRA site's guide and Gaussian prior), else ``None``."""
    if not (isinstance(q, Independent) and isinstance(p, Independent)):
        return None
    if q.batch_shape or p.batch_shape or q.event_shape != p.event_shape:
        return None
    qb, pb = q.base_dist, p.base_dist
    if type(qb) is not Normal or type(pb) is not Normal:
        return None
    return qb, pb


def _broadcast_scalar(t: torch.Tensor) -> torch.Tensor | None:
    """The 0-dim tensor that ``t`` broadcasts (all strides 0, as an i.i.d. prior's expanded
    parameters), else ``None``."""
    if all(st == 0 for st in t.stride()):
        return t.as_strided((), (), t.storage_offset())
    return None


def _prior_key(p: Normal) -> tuple[int, int] | None:
    """Sites whose priors broadcast the very same scalar parameters fuse without copying them."""
    loc, scale = _broadcast_scalar(p.loc), _broadcast_scalar(p.scale)
    if loc is None or scale is None:
        return None
    return (loc.data_ptr(), scale.data_ptr())


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' entries, concatenated into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _fused_normal_kl(pairs: list[tuple[Normal, Normal]], scalar_prior: bool) -> torch.Tensor:
    """``sum_i KL(q_i || p_i)`` for elementwise Normals in one autograd node: with ``scalar_prior``
    (every ``p_i`` broadcasts the same scalar loc and scale: BLoB's i.i.d. Gaussian prior)
    :func:`~pyro_llm.infer.normal_kl.iid_normal_kl_sum`, site by site without copies; otherwise
    one ``kl_divergence`` over the concatenated parameters."""
    locs, scales = [q.loc for q, _ in pairs], [q.scale for q, _ in pairs]
    if scalar_prior:
        p = pairs[0][1]
        p_loc, p_scale = _broadcast_scalar(p.loc), _broadcast_scalar(p.scale)
        if all(loc.shape == scale.shape for loc, scale in zip(locs, scales)):
            return iid_normal_kl_sum(locs, scales, p_loc, p_scale)
    else:
        p_loc, p_scale = _flat([p.loc for _, p in pairs]), _flat([p.scale for _, p in pairs])
    q = TorchNormal(_flat(locs), _flat(scales), validate_args=False)
    return kl_divergence(q, TorchNormal(p_loc, p_scale, validate_args=False)).sum()


def _check_reparametrized(name: str, site: dict[str, Any]) -> None:
    """Pyro's mean-field requirement (``check_fully_reparametrized``) without score parts."""
    if not site["fn"].has_rsample:
        raise NotImplementedError(f"site {name!r}: all distributions in the guide must be fully reparameterized")


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
            return self._fused_loss_particle(model_trace, guide_trace)
        except KeyError:  # a closed form was expected but not found: evaluate everything, as Pyro does
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
            return super()._differentiable_loss_particle(model_trace, guide_trace)

    def _fused_loss_particle(self, model_trace: Any, guide_trace: Any) -> tuple[float, torch.Tensor]:
        """``TraceMeanField_ELBO``'s particle loss, term for term, with the Normal/Normal KLs of
        sites sharing a scale (plate or KL weight) and no mask summed in one fused computation."""
        elbo: torch.Tensor | float = 0.0
        fused: dict[tuple[float, tuple[int, int] | None], list[tuple[Normal, Normal]]] = {}
        validate = is_validation_enabled()
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if validate:
                _check_reparametrized(name, guide_site)
            scale, mask = guide_site["scale"], guide_site["mask"]
            pair = _normal_pair(guide_site["fn"], model_site["fn"])
            if pair is not None and mask is None and isinstance(scale, (int, float)):
                fused.setdefault((float(scale), _prior_key(pair[1])), []).append(pair)
                continue
            try:
                kl = scale_and_mask(kl_divergence(guide_site["fn"], model_site["fn"]), scale=scale, mask=mask)
                elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
            except NotImplementedError:
                elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
        for (scale, prior_key), pairs in fused.items():
            elbo = elbo - scale * _fused_normal_kl(pairs, scalar_prior=prior_key is not None)
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                if validate:
                    _check_reparametrized(name, guide_site)
                elbo = elbo - guide_site["score_parts"].entropy_term.sum()
        return -torch_item(elbo), -elbo
