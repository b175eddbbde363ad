"""The linearised (GLM) predictive of a Gaussian guide: a Laplace guide, or a mean-field one.

``f(x) ~ N(f*(x), J Sigma J^T)`` with ``J`` the Jacobian of the answer logits with respect to the
site weights at the guide's mean. Per site and class ``c``, ``J_c`` is the matrix
``G_c = sum_t g_ct a_t^T`` (``d_out x d_in``). For a Laplace guide (K-FAC), with
``G~ = Q_S^T G Q_A``,

    (J Sigma J^T)_{cc'} = sum_sites [ <G_c, G_c'>_F / lambda + sum_ij G~_c,ij G~_c',ij (1/(s_i a_j + lambda) - 1/lambda) ]

For a mean-field guide (BLoB, IVON, Pyro's ``AutoNormal``: every guide that reports its per-entry
scales ``sigma``, :func:`~pyro_llm.guides.ops.guide_scales`) ``Sigma`` is diagonal and

    (J Sigma J^T)_{cc'} = sum_sites sum_ij sigma_ij^2 G_c,ij G_c',ij

the linearised predictive of a variational posterior (Immer, Korzepa & Bauer 2021, who found it
fixes the under-fitting of sampled BNN predictives for VI as for Laplace): the same posterior,
pushed through the network's first-order expansion around its mean instead of through the network.

With a head whose rows are its classes (a cloze head: one row per choice, each logit from its own
row; ``Head.rows_are_classes``) all classes' gradients are one backward of the logits' sum, each
row's share being its class's: the work and memory of one backward. Otherwise they come from one
batched backward over the classes (``is_grads_batched``; a loop over classes where an operation
does not support it), C backwards' work; classes masked out of every row of a batch (a fifth
letter that no question in the batch has) are skipped, their logits being constant.

Predictive probabilities: the probit approximation over the logits' differences
(:func:`probit_probs`; shift-invariant, as the exact predictive is) or Monte Carlo over logits,
averaging probabilities.
Covariances are computed for several prior precisions at once (for tuning by validation NLL).
Under several ranks each takes its share of the batches and all receive the whole result
(:mod:`pyro_llm.ranks`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .. import ranks
from ..checks import check_int
from ..data.collate import EncodedDataset
from ..guides.laplace import LaplaceGuide
from ..guides.ops import guide_median, guide_scales
from ..models.model import BayesianLoRAModel

__all__ = ["GLM_MAX_TOKENS", "glm_logit_moments", "linearised_predict", "probit_probs", "mc_probs"]

#: The default bound on padded tokens in one GLM batch. The pass holds a batch's whole forward graph
#: and its backward, so its memory grows with the tokens, not with the number of questions (a cloze
#: question is one row per choice); the docs' benchmarks give the memory per bound
#: (``python -m bench.glm_memory``).
GLM_MAX_TOKENS = 1024


def _class_grads(logits: torch.Tensor, outputs: list[torch.Tensor], classes: torch.Tensor,
                 reference: int | None = None) -> list[torch.Tensor]:
    """``d (logits[:, c] - logits[:, reference]) / d output`` for each class ``c`` in ``classes``
    (``reference`` ``None``: the logits themselves): tensors of shape ``len(classes) x output.shape``."""
    eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
    rows = eye[classes] - (eye[reference] if reference is not None else 0)
    grad_outputs = rows[:, None, :].expand(len(classes), *logits.shape)
    try:
        return list(torch.autograd.grad(logits, outputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                        retain_graph=True))
    except RuntimeError:
        per_class = [torch.autograd.grad((logits * r).sum(), outputs, retain_graph=True) for r in rows]
        return [torch.stack([g[i] for g in per_class]) for i in range(len(outputs))]


def _per_class_jacobians(logits: torch.Tensor, captured: list[tuple[torch.Tensor, torch.Tensor]],
                         active: torch.Tensor, rows_are_classes: bool, reference: int | None = None) -> list[torch.Tensor]:
    """Each site's per-example, per-class Jacobian matrices ``G [B, Ca, d_out, d_in]`` of the
    ``active`` classes' logits (``captured``: each site's input and output in the forward), or of
    their differences from class ``reference``'s logit (a head whose rows are not its classes)."""
    B, C = logits.shape
    outputs = [out for _, out in captured]
    if rows_are_classes:  # one backward: row (b, c)'s gradient is d logit[b, c] / d output, alone
        grads = torch.autograd.grad(logits.sum(), outputs)
        jac = []
        for (x, _), g in zip(captured, grads):
            if x.shape[0] != B * C:
                raise ValueError(f"a head with rows_are_classes must run {B} x {C} rows; a site saw {x.shape[0]}")
            a = x.reshape(B, C, -1, x.shape[-1])[:, active].double()
            g = g.reshape(B, C, -1, g.shape[-1])[:, active].double()
            jac.append(torch.einsum("bcto,bcti->bcoi", g, a))
        return jac
    jac = []
    for (x, _), g in zip(captured, _class_grads(logits, outputs, active, reference)):
        a = x.reshape(B, -1, x.shape[-1]).double()
        g = g.reshape(len(active), B, -1, g.shape[-1]).double()
        jac.append(torch.einsum("cbto,bti->bcoi", g, a))
    return jac


class _KroneckerCovariance:
    """``J Sigma J^T`` of a Laplace guide's K-FAC blocks, site by site, at ``L`` prior precisions."""

    def __init__(self, guide: LaplaceGuide, prior_precisions: torch.Tensor | None) -> None:
        if prior_precisions is None:  # the guide's own: one row, scalar or per site
            lams = guide.prior_precision.double().reshape(1, -1)
        else:  # a vector is L scalar precisions; a matrix is L x sites
            lams = prior_precisions.double()
            lams = lams.reshape(-1, 1) if lams.dim() <= 1 else lams
        n = len(guide.model.site_names)
        self.guide, self.levels = guide, lams.shape[0]
        self.site_lams = lams if lams.shape[1] == n else lams[:, :1].expand(-1, n)

    def means(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.guide.median()

    def __call__(self, i: int, name: str, G: torch.Tensor) -> torch.Tensor:
        block = self.guide.blocks[name]
        lam = self.site_lams[:, i].to(G.device)
        Gt = block.project(G)
        w = block.covariance_weights(lam)  # L x kS x kA
        return (torch.einsum("bcoi,bdoi->bcd", G, G)[None] / lam[:, None, None, None]
                + torch.einsum("bcij,bdij,lij->lbcd", Gt, Gt, w))


class _DiagonalCovariance:
    """``J Sigma J^T`` of a mean-field Gaussian guide: each site's entries independent, ``sigma^2``
    their variances, one level per set of variances (the guide's own, or others given)."""

    def __init__(self, guide: Any, variances: Sequence[Mapping[str, torch.Tensor]], names: list[str],
                 device: torch.device) -> None:
        self.guide, self.levels = guide, len(variances)
        # each site's L sets stacked once (L x d_out x d_in), not again in every batch
        self.variances = {n: torch.stack([v[n] for v in variances]).to(device, torch.float64) for n in names}

    def means(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in guide_median(self.guide, batch).items() if k in self.variances}

    def __call__(self, i: int, name: str, G: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bcoi,bdoi,loi->lbcd", G, G, self.variances[name])


def _covariance_of(guide: Any, prior_precisions: torch.Tensor | None, names: list[str],
                   variances: Sequence[Mapping[str, torch.Tensor]] | None, device: torch.device
                   ) -> _KroneckerCovariance | _DiagonalCovariance:
    if isinstance(guide, LaplaceGuide):
        if variances is not None:
            raise ValueError("variances apply to a mean-field guide; a Laplace guide's covariance is its K-FAC "
                             "posterior's (choose its prior_precisions)")
        return _KroneckerCovariance(guide, prior_precisions)
    if prior_precisions is not None:
        raise ValueError("prior_precisions applies to a Laplace guide; a variational guide's covariance is its own "
                         "(or variances given: pyro_llm.infer.reprior)")
    if variances is None:
        scales = guide_scales(guide)
        if scales is None:
            raise TypeError(f"the linearised predictive needs a Gaussian guide: a Laplace guide, or a mean-field one "
                            f"that reports its scales (pyro_llm.guides.ReportsScales); {type(guide).__name__} is "
                            "neither")
        variances = [{n: s.detach().double().pow(2) for n, s in scales.items()}]
    if not variances:
        raise ValueError("variances must hold at least one set of per-site variances")
    for v in variances:
        missing = [n for n in names if n not in v]
        if missing:
            raise ValueError(f"no variances for the sites {missing}: the linearised predictive needs every site's")
    return _DiagonalCovariance(guide, variances, names, device)


def glm_logit_moments(guide: Any, data: EncodedDataset, prior_precisions: torch.Tensor | None = None, *,
                      variances: Sequence[Mapping[str, torch.Tensor]] | None = None,
                      model: BayesianLoRAModel | None = None, batch_size: int = 4,
                      max_tokens: int | None = GLM_MAX_TOKENS, progress: bool = True,
                      relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logits ``[N, C]`` and logit covariances ``[L, N, C, C]`` of ``guide``'s linearised
    predictive. A Laplace guide gives one covariance per prior precision: ``prior_precisions`` is
    a vector of ``L`` scalars or an ``L x sites`` matrix (default: the guide's own); a mean-field
    guide (one reporting its scales) gives its own (``L = 1``), or one per set of per-site
    ``variances`` given (``L`` sets of ``sigma^2``, e.g. the guide under other priors,
    :mod:`pyro_llm.infer.reprior`), its means unchanged. ``model``: the guide's model
    (default ``guide.model``). A batch holds at most ``batch_size`` rows and ``max_tokens`` padded
    tokens (every choice of a cloze row counted; ``None``: no bound), which bounds the pass's memory.

    ``relative``: the covariances of the logits' differences from the first class a batch has
    (``f_c - f_r``; its row and column zero), all a predictive that is unchanged by adding one
    offset to every logit needs (:func:`probit_probs`, :func:`mc_probs`), at one backward per
    batch fewer where every class takes its own (``C - 1`` instead of ``C``: half the Jacobian
    work on two classes). A head whose rows are its classes returns its full covariances, which
    those predictives read the same, at no extra cost."""
    check_int("max_tokens", max_tokens, low=1, optional=True)
    model = model if model is not None else guide.model
    names = model.site_names
    device = model.device
    covariance = _covariance_of(guide, prior_precisions, names, variances, device)
    means, covs = [], []
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[name] = (inputs[0].detach(), output)
        return fn

    rows_are_classes = bool(getattr(model.head, "rows_are_classes", False))
    batches = ranks.shard(data.by_length(batch_size, max_tokens))  # this rank's share (all, alone)
    handles = [s.module.register_forward_hook(hook(s.name)) for s in model.sites]
    values: dict[str, torch.Tensor] | None = None
    try:
        for idx in tqdm(batches, desc="glm", disable=not progress, leave=False):
            batch = data.batch(idx, device)
            if values is None:  # the guide's means (a mean-field guide may need a batch to answer)
                values = {k: v.detach().requires_grad_(True) for k, v in covariance.means(batch).items()}
            captured.clear()
            with torch.enable_grad():
                logits = model.logits_at(batch, values)
                # a class masked out of every row has a constant logit: zero Jacobian, no backward needed
                active = torch.nonzero(batch["choice_mask"].any(0)).flatten()
                if relative and not rows_are_classes and len(active) > 1:  # class active[0]'s difference is 0
                    reference, active = int(active[0]), active[1:]
                else:
                    reference = None
                jacobians = _per_class_jacobians(logits, [captured[n] for n in names], active, rows_are_classes,
                                                 reference)
            B, C = logits.shape
            cov_a = sum(covariance(i, name, G) for i, (name, G) in enumerate(zip(names, jacobians)))
            cov = torch.zeros(covariance.levels, B, C, C, dtype=torch.float64, device=device)
            cov[:, :, active[:, None], active[None, :]] = cov_a
            means.append(logits.detach().double().cpu())
            covs.append(cov.transpose(0, 1).cpu())  # rows first
    finally:
        for h in handles:
            h.remove()
    C = data.choice_mask.shape[1]
    mean = ranks.rows_across(batches, means, (len(data), C), torch.float64)
    cov = ranks.rows_across(batches, covs, (len(data), covariance.levels, C, C), torch.float64)
    return mean, cov.transpose(0, 1)


def probit_probs(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The probit (mean-field) approximation of ``E[softmax(f)]``, ``f ~ N(mean, cov)``, from the
    logits' differences:

        p_c  propto  1 / sum_k exp(-(mu_c - mu_k) / sqrt(1 + pi/8 Var(f_c - f_k)))

    normalised over ``c`` (Lu, Ie & Sha 2020, with each difference's variance taken from the full
    covariance). For two classes it is MacKay's probit of the logit difference, and like the exact
    predictive it does not change when one (even random) offset is added to every logit. The
    per-class form ``softmax(mu / sqrt(1 + pi/8 diag Sigma))`` does change: it divides each logit's
    offset too, so on logits with a large common offset (a cloze head's summed log-likelihoods) it
    reorders classes."""
    d = torch.diagonal(cov, dim1=-2, dim2=-1)
    var = (d[..., :, None] + d[..., None, :] - cov - cov.transpose(-1, -2)).clamp_min(0)  # Var(f_c - f_k)
    z = (mean[..., None, :] - mean[..., :, None]) / torch.sqrt(1 + math.pi / 8 * var)  # [.., c, k]: mu_k - mu_c
    return torch.softmax(-torch.logsumexp(z, dim=-1), dim=-1)


def mc_probs(mean: torch.Tensor, cov: torch.Tensor, num_samples: int = 1000,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``E[softmax(f)]``, ``f ~ N(mean, cov)``, by Monte Carlo (probabilities averaged, not logits)."""
    C = mean.shape[-1]
    jitter = 1e-9 * torch.eye(C, dtype=cov.dtype) + 1e-6 * torch.diag_embed(
        torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1, keepdim=True).expand(*cov.shape[:-2], C))
    chol = torch.linalg.cholesky(cov + jitter)
    eps = torch.randn(num_samples, *mean.shape, dtype=cov.dtype, generator=generator)
    f = mean + torch.einsum("...ij,s...j->s...i", chol, eps)
    return torch.softmax(f, -1).mean(0)


def linearised_predict(guide: Any, data: EncodedDataset, *, mc_samples: int | None = None,
                       variances: Sequence[Mapping[str, torch.Tensor]] | None = None,
                       model: BayesianLoRAModel | None = None, batch_size: int = 4,
                       max_tokens: int | None = GLM_MAX_TOKENS, progress: bool = True) -> torch.Tensor:
    """The linearised predictive's probabilities ``[N, C]`` (float32) under ``guide`` (its own
    covariance: a Laplace guide's prior precision, a mean-field guide's scales or one set of
    ``variances`` given): the probit of the logits' differences, or with ``mc_samples`` Monte
    Carlo over the logits, its draws seeded from the global generator. Both are unchanged by one
    offset on every logit, so the moments are those of the differences (``relative``)."""
    mean, cov = glm_logit_moments(guide, data, variances=variances, model=model, batch_size=batch_size,
                                  max_tokens=max_tokens, progress=progress, relative=True)
    if mc_samples is None:
        return probit_probs(mean, cov[0]).float()
    check_int("mc_samples", mc_samples, low=1)
    gen = torch.Generator().manual_seed(int(torch.randint(2**62, ())))  # from the seeded global generator
    return mc_probs(mean, cov[0], mc_samples, gen).float()
