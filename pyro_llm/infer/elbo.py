"""The mean-field ELBO: closed-form KLs wherever the guide's marginal has one, nothing else evaluated.

``ELBO = E_q[log p(D | A)] - sum_sites KL(q(A_s) || p(A_s))``, with each site's KL

* in closed form when its guide distribution and prior have one (BLoB's Normal against a Gaussian
  prior), **including Pyro's ``AutoNormal``**: it samples an auxiliary ``<site>_unconstrained``
  from a Normal and puts a ``Delta`` at the site; when the transform to the prior's support is the
  identity (the ``Delta``'s value *is* the auxiliary value: real-valued sites) the site's marginal
  is that Normal, and its KL replaces both the auxiliary site's ``log q`` and the site's ``log p``;
* otherwise estimated from the sample, ``log p(A) - log q(A)`` (Student-t or Laplace priors,
  low-rank guides, hyper-parameters on a positive support). A ``Delta`` guide site counts with its
  ``log_density`` (the log-Jacobian ``AutoNormal`` puts there for a constrained site; Pyro's
  registered ``KL(Delta || p) = -log p`` would drop it), so the estimate is unbiased.

``pyro.infer.TraceMeanField_ELBO`` evaluates ``log p`` and ``log q`` of *every* site first; with
one site per LoRA matrix (60 for SmolLM2 with q/v targets) those unused log-densities are a
measurable share of a BLoB step's overhead over plain LoRA. :class:`MeanFieldELBO` decides per
site which terms its loss reads (:func:`_plan`) and computes only those.

The closed-form KLs of Normal guides against Normal priors (BLoB, ``AutoNormal`` with the default
Gaussian prior) are summed in one fused computation over all such sites with the same scale (and,
for i.i.d. priors, the same scalar parameters, which are then not copied) instead of one small
graph per site: the same sum, with a constant number of autograd nodes (and, for the i.i.d.
prior, no full-size temporaries: :mod:`pyro_llm.infer.normal_kl`).
``tests/infer/test_elbo.py`` checks loss and gradients against ``TraceMeanField_ELBO`` where the two
estimators coincide, and against closed forms where they do not.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Delta, Independent, Normal
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch.distributions import Normal as TorchNormal, kl_divergence
from torch.distributions.kl import _dispatch_kl

from ..distributions import FlatNormal, NormalPiece, base_distribution
from .normal_kl import iid_normal_kl_sum

__all__ = ["MeanFieldELBO", "has_closed_form_kl", "normal_marginal"]


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
    if not (isinstance(qb, Normal) and isinstance(pb, Normal)):
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


def _whole_draws(pairs: list[tuple[Normal, Normal]]) -> tuple[list[FlatNormal], list[tuple[Normal, Normal]]]:
    """The joint draws (:class:`~pyro_llm.distributions.FlatNormal`) all of whose pieces are among
    ``pairs``, and the pairs left over."""
    by_whole: dict[int, list[tuple[Normal, Normal]]] = {}
    for pair in pairs:
        if isinstance(pair[0], NormalPiece):
            by_whole.setdefault(id(pair[0].whole), []).append(pair)
    wholes, used = [], set()
    for group in by_whole.values():
        whole = group[0][0].whole
        if sorted(q.name for q, _ in group) == sorted(whole.names):  # every piece, once
            wholes.append(whole)
            used.update(id(q) for q, _ in group)
    return wholes, [pair for pair in pairs if id(pair[0]) not in used]


def _fused_normal_kl(pairs: list[tuple[Normal, Normal]], scalar_prior: bool) -> torch.Tensor:
    """``sum_i KL(q_i || p_i)`` for elementwise Normals in one autograd node: with ``scalar_prior``
    (every ``p_i`` broadcasts the same scalar loc and scale: BLoB's i.i.d. Gaussian prior)
    :func:`~pyro_llm.infer.normal_kl.iid_normal_kl_sum`, over each whole joint draw's flat
    parameters at once and site by site without copies for the rest; otherwise one
    ``kl_divergence`` over the concatenated parameters."""
    locs, scales = [q.loc for q, _ in pairs], [q.scale for q, _ in pairs]
    if scalar_prior:
        wholes, rest = _whole_draws(pairs)
        locs = [w.loc for w in wholes] + [q.loc for q, _ in rest]
        scales = [w.scale for w in wholes] + [q.scale for q, _ in rest]
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
    wrappers) that is the KL of ``q``'s density; ``False`` when unsure, which only costs a
    log-density evaluation. A ``Delta`` never has one (module docstring)."""
    if isinstance(base_distribution(q), Delta):
        return False
    types = _unwrap(q, p)
    return types is not None and _dispatch_kl(*types) is not NotImplemented


def _auxiliary_by_value(guide_trace: Trace) -> dict[int, tuple[str, Any]]:
    """``id(value) -> (name, distribution)`` of the trace's auxiliary sample sites."""
    return {id(site["value"]): (name, site["fn"]) for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and site["infer"].get("is_auxiliary")}


def normal_marginal(guide_trace: Trace, name: str, auxiliary: dict[int, tuple[str, Any]] | None = None
                    ) -> tuple[Any, str | None]:
    """The distribution of guide site ``name`` and, when it is a ``Delta`` placed exactly on an
    auxiliary site's value (``AutoNormal`` on a real-valued site: the identity transform), that
    auxiliary site's distribution and name instead. Found by the value's identity, not by names;
    pass ``auxiliary`` (:func:`_auxiliary_by_value`) when asking for many sites of one trace."""
    site = guide_trace.nodes[name]
    delta = base_distribution(site["fn"])
    if isinstance(delta, Delta):
        aux = (auxiliary if auxiliary is not None else _auxiliary_by_value(guide_trace)).get(id(delta.v))
        if aux is not None and guide_trace.nodes[aux[0]]["value"] is delta.v:
            return aux[1], aux[0]
    return site["fn"], None


@dataclass
class _Plan:
    """Which terms of the ELBO a trace pair's loss reads."""

    kl: dict[str, Any] = field(default_factory=dict)  # latent site -> guide distribution of its closed-form KL
    sampled: set[str] = field(default_factory=set)  # latent sites estimated by log p - log q
    auxiliary: set[str] = field(default_factory=set)  # auxiliary guide sites whose log q enters


def _plan(model_trace: Trace, guide_trace: Trace) -> _Plan:
    plan = _Plan()
    absorbed = set()
    auxiliary = _auxiliary_by_value(guide_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        q, partner = normal_marginal(guide_trace, name, auxiliary)
        if has_closed_form_kl(q, site["fn"]):
            plan.kl[name] = q
            if partner is not None:
                absorbed.add(partner)
        else:
            plan.sampled.add(name)
    plan.auxiliary = {n for n, s in guide_trace.nodes.items()
                      if s["type"] == "sample" and n not in model_trace.nodes and n not in absorbed}
    return plan


class MeanFieldELBO(ELBO):
    """The mean-field ELBO of the module docstring: Pyro's ``ELBO`` interface (``loss``,
    ``differentiable_loss``, ``loss_and_grads``; ``num_particles`` and ``vectorize_particles``),
    one closed-form KL per site where the guide's marginal has one, and the Normal/Normal KLs of
    sites sharing a scale summed in one fused computation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: weakref.WeakKeyDictionary[Trace, _Plan] = weakref.WeakKeyDictionary()
        self._terms: list[tuple[torch.Tensor | float, torch.Tensor | float]] = []

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> tuple[Trace, Trace]:
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            raise NotImplementedError("MeanFieldELBO needs a callable guide; use Trace_ELBO for a GuideMessenger")
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":
                    _check_reparametrized(name, site)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        plan = _plan(model_trace, guide_trace)
        self._plans[guide_trace] = plan  # read back by _particle_loss, not recomputed
        model_trace.compute_log_prob(lambda name, site: site["is_observed"] or name in plan.sampled)
        needed = plan.sampled | plan.auxiliary
        if needed:  # log q of just these guide sites, written into the very site dicts of the trace
            sub = Trace(graph_type="flat")
            sub.nodes.update((n, guide_trace.nodes[n]) for n in needed)
            sub.compute_log_prob()
        return model_trace, guide_trace

    def _particle_loss(self, model_trace: Trace, guide_trace: Trace) -> torch.Tensor:
        """The negative ELBO of one particle (module docstring)."""
        plan = self._plans.pop(guide_trace, None) or _plan(model_trace, guide_trace)
        elbo: torch.Tensor | float = 0.0
        loglik: torch.Tensor | float = 0.0
        fused: dict[tuple[float, tuple[int, int] | None], list[tuple[Normal, Normal]]] = {}
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                loglik = loglik + model_site["log_prob_sum"]
            elif name in plan.sampled:
                elbo = elbo + model_site["log_prob_sum"] - guide_trace.nodes[name]["log_prob_sum"]
            else:
                q, p = plan.kl[name], model_site["fn"]
                scale, mask = guide_trace.nodes[name]["scale"], guide_trace.nodes[name]["mask"]
                pair = _normal_pair(q, p)
                if pair is not None and mask is None and isinstance(scale, (int, float)):
                    fused.setdefault((float(scale), _prior_key(pair[1])), []).append(pair)
                    continue
                kl = scale_and_mask(kl_divergence(q, p), scale=scale, mask=mask)
                elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * q.batch_shape.numel())
        for (scale, prior_key), pairs in fused.items():
            elbo = elbo - scale * _fused_normal_kl(pairs, scalar_prior=prior_key is not None)
        for name in plan.auxiliary:
            elbo = elbo - guide_trace.nodes[name]["log_prob_sum"]
        self._terms.append((loglik, loglik - elbo))
        return -elbo

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = 0.0
        self._terms = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_loss(model_trace, guide_trace) / self.num_particles
        return loss

    @property
    def last_terms(self) -> dict[str, torch.Tensor | float]:
        """The two parts of the last loss, averaged over particles (tensors, not synchronised):
        ``"nll"``, the expected negative log-likelihood of the data, and ``"kl"``, the (weighted)
        KL term or its estimate, so that ``loss = nll + kl``."""
        n = max(len(self._terms), 1)
        return {"nll": -sum(t[0] for t in self._terms) / n, "kl": sum(t[1] for t in self._terms) / n}

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        return torch_item(loss)
