"""K-FAC factors of the LoRA sites, collected with hooks in one forward and backward per batch.

For every site module (a LoRA ``A`` or ``B`` matrix) a forward hook keeps the input ``a`` of each
row and a tensor hook on the output receives ``g = dL/d(output)``, where ``L`` is the summed
negative log-likelihood of labels drawn from the model's own predictive (``fisher="mc"``, the
Fisher) or of the true labels (``fisher="empirical"``). Rows are the real (unpadded) tokens.

Weight sharing over sequence positions (Eschenhagen et al. 2023):

* ``expand``: every token is an example: ``S = sum_{n,t} g g^T``, ``A = mean_{n,t} a a^T``;
* ``reduce``: positions are pooled first, ``g_n = sum_t g_nt``, ``a_n = mean_t a_nt``:
  ``S = sum_n g_n g_n^T``, ``A = mean_n a_n a_n^T`` (cheaper, and exact for one position).

The factor of dimension at most ``dense_threshold`` is accumulated densely in float64 and
eigendecomposed at the end; a larger one is streamed as a rank-``n_kfac`` eigenbasis updated by a
thin SVD per batch, so no ``d x d`` matrix is formed. The larger factor of each pair is kept at
rank ``n_kfac`` (the smaller in full), as in Laplace-LoRA.

Sites fed the very same input tensor (the ``A`` matrices of ``q_proj`` and ``v_proj``, which both
read a layer's hidden states) have the very same input factor: it is accumulated and
eigendecomposed once and handed to each of them. The sharing found on the first batch is checked
on every later one; should a model route inputs differently from batch to batch, the fit starts
again without sharing, so the factors never depend on it.

Several ranks (:mod:`pyro_llm.ranks`): each takes every ``world``-th batch, and before any
eigendecomposition the ranks sum, in one all-reduce, every factor (a dense one as the upper
triangle of its ``d x d`` sum; a streamed one as its rank-``n_kfac`` basis in the rank's own slot,
so the sum concatenates the bases), the rows counted and the log-likelihood. Dense factors,
evidence and everything after them equal one process's to float tolerance. The sampled Fisher's
labels come from one uniform per example drawn before the pass, so they do not depend on how
the batches are shared out either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import ranks
from ..checks import check_int
from ..options import option
from ..data.collate import EncodedDataset
from ..models.model import BayesianLoRAModel
from .kron import EigenFactor

__all__ = ["KFACConfig", "KFACFactors", "FactorAccumulator", "fit_kfac"]


@dataclass(frozen=True)
class KFACConfig:
    fisher: str = option("mc", "mc: labels sampled from the model (the Fisher); empirical: the true labels.",
                         choices=("mc", "empirical"))
    mode: str = option("reduce", "Treatment of sequence positions (Eschenhagen et al. 2023).",
                       choices=("reduce", "expand"), flag="--kfac-mode")
    n_kfac: int = option(10, "Rank kept of the large K-FAC factor of each LoRA matrix.")
    dense_threshold: int = option(4096, "Factors larger than this are streamed at low rank (0: every factor).")
    batch_size: int = option(4, "Examples per batch of the K-FAC pass.", flag="--kfac-batch-size")

    def __post_init__(self) -> None:
        if self.fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be 'mc' or 'empirical', got {self.fisher!r}")
        if self.mode not in ("reduce", "expand"):
            raise ValueError(f"mode must be 'reduce' or 'expand', got {self.mode!r}")
        check_int("n_kfac", self.n_kfac, low=1)
        check_int("dense_threshold", self.dense_threshold, low=0)  # 0: stream every factor at low rank
        check_int("batch_size", self.batch_size, low=1)


class _SharingChanged(RuntimeError):
    """Sites that shared an input on the first batch no longer do."""


class FactorAccumulator:
    """Running ``sum x x^T`` of row vectors, dense or as a streamed rank-``rank`` eigenbasis.

    Dense accumulation keeps the rows themselves, as the hooks computed them (no cast, no copy on
    the device per batch), while there are at most ``dim`` of them (K-FAC "reduce" on a few hundred
    prompts: one row per prompt against ``d = 576``): the eigenpairs then come from a thin SVD of
    the ``n x d`` rows, exactly, at ``O(n^2 d)`` instead of a ``d x d`` eigenproblem. Once there
    are more than ``dim`` rows and more than ``keep`` numbers kept, they are folded into a float64
    ``d x d`` sum, many batches at a time. Nothing is decomposed before the end (:func:`decompose`),
    where all factors of one kind go through one batched call on the CPU in float64.
    """

    def __init__(self, dim: int, rank: int, dense: bool, device: torch.device, keep: int = 2 ** 20) -> None:
        self.dim, self.rank, self.dense, self.keep = dim, min(rank, dim), dense, keep
        self.count = 0
        self._results: dict[tuple[float, int | None], EigenFactor] = {}
        self.device = device
        self.mat: torch.Tensor | None = None  # the dense d x d sum (float64), once formed
        self.rows: list[torch.Tensor] = []  # dense mode: rows not yet folded into mat
        self.num_rows = 0  # rows in self.rows
        self._basis: torch.Tensor | None = None  # streamed mode: columns U with U U^T ~ sum

    @property
    def basis(self) -> torch.Tensor:
        if self._basis is None:
            return torch.zeros(self.dim, 0, dtype=torch.float64, device=self.device)
        return self._basis

    def add(self, rows: torch.Tensor, count: int) -> None:
        self.count += count
        if rows.shape[0] == 0:
            return
        if self.dense:
            self.rows.append(rows)
            self.num_rows += rows.shape[0]
            if self.num_rows > self.dim and self.num_rows * self.dim > self.keep:
                self.fold()
            return
        stacked = _finite(torch.cat([self.basis, rows.double().T], dim=1))
        U, sv, _ = torch.linalg.svd(stacked, full_matrices=False)
        k = min(self.rank, sv.shape[0])
        self._basis = U[:, :k] * sv[:k]

    def fold(self) -> None:
        """Add the kept rows to the dense ``d x d`` sum (forming it)."""
        if not self.rows:
            return
        R = torch.cat(self.rows).double() if len(self.rows) > 1 else self.rows[0].double()
        self.mat = R.T @ R if self.mat is None else self.mat.addmm_(R.T, R)
        self.rows, self.num_rows = [], 0

    def same_kind(self, other: "FactorAccumulator") -> bool:
        return (self.dim, self.rank, self.dense) == (other.dim, other.rank, other.dense)

    def result(self, scale: float, rank: int | None) -> EigenFactor:
        """The eigen-factor of ``scale * sum x x^T`` (computed once per ``(scale, rank)``)."""
        key = (scale, rank)
        if key not in self._results:
            self._results[key] = decompose([(self, scale, rank)])[0]
        return self._results[key]


def _finite(t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise FloatingPointError("non-finite activations or gradients while collecting K-FAC factors")
    return t


def decompose(requests: list[tuple[FactorAccumulator, float, int | None]]) -> list[EigenFactor]:
    """The eigen-factors of ``scale * sum x x^T`` for many ``(accumulator, scale, rank)`` at once.

    Accumulators of one kind are decomposed together, in float64 on the CPU, and the results go
    back to the accumulators' device in one transfer per kind: the rows of all factors with the
    same ``n x d`` in one batched thin SVD, the small dense sums of one ``d`` in one batched
    ``eigh``. Large dense sums use :func:`~pyro_llm.curvature.eig.top_eigenpairs` each, streamed
    bases a thin SVD each. One finiteness check (one host sync) covers all batched inputs."""
    out: list[EigenFactor] = [None] * len(requests)  # type: ignore[list-item]  # every one filled below
    by_rows: dict[tuple[int, int], list[int]] = {}
    by_mat: dict[int, list[int]] = {}
    for i, (acc, _, rank) in enumerate(requests):
        if acc.dense and acc.mat is not None:
            acc.fold()
            if 4 * min(acc.dim, 2 * (rank or acc.rank) + 8) >= acc.dim:  # top_eigenpairs would go dense too
                by_mat.setdefault(acc.dim, []).append(i)
            else:
                out[i] = EigenFactor.from_matrix(_finite(acc.mat) * requests[i][1], rank or acc.rank)
        elif acc.dense and acc.rows:
            by_rows.setdefault((acc.num_rows, acc.dim), []).append(i)
        else:
            out[i] = _gram_eigen(acc.basis, requests[i][1], rank or acc.rank)
    batches = [(False, idx, torch.cat([r for i in idx for r in requests[i][0].rows]).view(len(idx), n, d))
               for (n, d), idx in by_rows.items()]
    batches += [(True, idx, torch.stack([requests[i][0].mat for i in idx])) for idx in by_mat.values()]
    if batches:
        flags = torch.stack([t.isfinite().all() for _, _, t in batches])
        if not bool(flags.all()):
            raise FloatingPointError("non-finite activations or gradients while collecting K-FAC factors")
    for is_sum, idx, stacked in batches:
        device = requests[idx[0]][0].device
        data = stacked.to("cpu", torch.float64)
        scales = torch.tensor([requests[i][1] for i in idx], dtype=torch.float64)[:, None]
        if is_sum:
            vals, vecs = torch.linalg.eigh(data)  # ascending
            vals, vecs = (vals.flip(-1) * scales).clamp_min(0.0), vecs.flip(-1)
        else:
            vecs, sv, _ = torch.linalg.svd(data.transpose(1, 2), full_matrices=False)
            vals = sv.square() * scales
        vals, vecs = vals.to(device), vecs.to(device)
        for j, i in enumerate(idx):
            acc, _, rank = requests[i]
            k = min(rank or acc.rank, vals.shape[-1])
            out[i] = EigenFactor(vals[j, :k], vecs[j, :, :k])
    return out


def _gram_eigen(columns: torch.Tensor, scale: float, rank: int) -> EigenFactor:
    """The top-``rank`` eigenpairs of ``scale * C C^T`` for ``C`` of shape ``d x m``, exactly, from
    the thin SVD of ``C`` (``C = U S V^T`` gives eigenvectors ``U`` and eigenvalues ``S^2``)."""
    if columns.shape[1] == 0:
        return EigenFactor(torch.zeros(0, dtype=columns.dtype, device=columns.device), columns)
    U, sv, _ = torch.linalg.svd(_finite(columns), full_matrices=False)
    k = min(rank, sv.shape[0])
    return EigenFactor((sv[:k] ** 2) * scale, U[:, :k].contiguous())


@dataclass
class KFACFactors:
    """Per-site ``(S, A)`` eigen-factors and the data log-likelihood at the MAP."""

    factors: dict[str, tuple[EigenFactor, EigenFactor]]
    log_likelihood: float
    num_examples: int
    config: KFACConfig


class _SiteHooks:
    def __init__(self, name: str, module: torch.nn.Module, cfg: KFACConfig, state: dict[str, Any]) -> None:
        self.name, self.cfg, self.state = name, cfg, state
        d_out, d_in = module.out_features, module.in_features
        big_out = d_out >= d_in
        dev = module.weight.device
        self.S = FactorAccumulator(d_out, cfg.n_kfac if big_out else d_out, d_out <= cfg.dense_threshold, dev)
        self.A = FactorAccumulator(d_in, d_in if big_out else cfg.n_kfac, d_in <= cfg.dense_threshold, dev)
        self.handle = module.register_forward_hook(self._forward)
        self.partner: _SiteHooks | None = None  # the earlier site fed the same input (first batch)
        self.owner: _SiteHooks | None = None  # the site whose input factor this one shares

    def _weights(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """The batch's ``B x 1 x T`` row weights (``"mask"``: 1 on real tokens; ``"mean"``: the mask
        over each row's length), made once per batch in ``_fit``; all ones for inputs of another shape."""
        w = self.state[key]
        if x.dim() == 3 and w is not None and w.shape[0] == x.shape[0] and w.shape[2] == x.shape[1]:
            return w.to(x.dtype)  # no copy when the dtype is already x's
        ones = torch.ones(x.shape[0], 1, x[0].numel() // x.shape[-1], dtype=x.dtype, device=x.device)
        return ones / ones.shape[2] if key == "mean" else ones

    def _forward(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        x = inputs[0]
        mask = self._weights(x, "mask")
        output.register_hook(lambda g, m=mask: self._backward(g, m))
        if self._shares_input(x):
            return
        x = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        if self.cfg.mode == "reduce":  # masked mean over positions as one batched product
            rows = torch.bmm(self._weights(x, "mean"), x).squeeze(1)
        else:
            rows = x.reshape(-1, x.shape[-1])[mask.reshape(-1) > 0]
        self.A.add(rows, rows.shape[0])

    def _shares_input(self, x: torch.Tensor) -> bool:
        """Whether another site already took ``x`` into the input factor this one shares."""
        if not self.state["share"]:
            return False
        seen: list[tuple[torch.Tensor, _SiteHooks]] = self.state["inputs"]
        first = next((h for t, h in seen if t is x), None)
        if self.state["first_batch"]:
            self.partner = first
            if first is not None and first.A.same_kind(self.A):
                self.owner, self.A = first, first.A
        elif first is not self.partner:
            raise _SharingChanged(self.name)
        if self.owner is not None:
            return True
        seen.append((x, self))
        return False

    def _backward(self, grad: torch.Tensor, mask: torch.Tensor) -> None:
        g = grad.detach().reshape(grad.shape[0], -1, grad.shape[-1])
        if self.cfg.mode == "reduce":
            rows = torch.bmm(mask.to(g.dtype), g).squeeze(1)
        else:
            rows = g.reshape(-1, g.shape[-1])[mask.reshape(-1) > 0]
        self.S.add(rows, rows.shape[0])

    def requests(self) -> list[tuple[FactorAccumulator, float, int | None]]:
        # S is a sum over examples/tokens, A a mean (see the module docstring)
        return [(self.S, 1.0, None), (self.A, 1.0 / max(self.A.count, 1), None)]


def _sampled_labels(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Labels drawn from ``softmax`` rows given by ``logp``, by inverting each row's distribution
    function at its uniform ``u`` (a class of probability zero is never drawn)."""
    cdf = logp.double().exp().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)


def _unique_requests(hooks: list[_SiteHooks]) -> dict[int, tuple[FactorAccumulator, float, int | None]]:
    """Each accumulator's decomposition request once, however many sites share it (by ``id``)."""
    unique: dict[int, tuple[FactorAccumulator, float, int | None]] = {}
    for h in hooks:
        for req in h.requests():
            unique.setdefault(id(req[0]), req)
    return unique


def _sum_across_ranks(hooks: list[_SiteHooks], loglik: torch.Tensor, changed: bool) -> torch.Tensor:
    """Sum every factor, row count and the log-likelihood over the ranks (module docstring) in one
    all-reduce, after agreeing (one small all-reduce) that no rank saw the input sharing change and
    that all hold factors of the same shapes. Returns the summed log-likelihood."""
    rank, size = ranks.world()
    if size == 1:
        return loglik
    accs = [acc for acc, _, _ in _unique_requests(hooks).values()]
    numel = 2 + len(accs) + sum(a.dim * (a.dim + 1) // 2 if a.dense else size * a.dim * a.rank for a in accs)
    flags = ranks.max_across([torch.tensor([float(changed), numel, -numel], dtype=torch.float64)])[0]
    if flags[0] > 0:
        raise _SharingChanged("another rank")
    if flags[1] != -flags[2]:
        raise RuntimeError("the ranks collected K-FAC factors of different shapes (models built differently?)")
    dev = loglik.device  # every part where the factors are: one buffer, moved (if at all) once
    parts = [loglik.reshape(1), torch.tensor([float(a.count) for a in accs], dtype=torch.float64, device=dev)]
    for a in accs:
        if a.dense:
            a.fold()
            mat = a.mat if a.mat is not None else torch.zeros(a.dim, a.dim, dtype=torch.float64, device=dev)
            iu = torch.triu_indices(a.dim, a.dim, device=dev)
            parts.append(mat.to(dev)[iu[0], iu[1]])
        else:
            slots = torch.zeros(size, a.dim, a.rank, dtype=torch.float64, device=dev)
            basis = a.basis.to(dev)
            slots[rank, :, :basis.shape[1]] = basis
            parts.append(slots)
    summed = ranks.sum_across(parts)
    for a, count in zip(accs, summed[1].tolist()):
        a.count = int(count)
    for a, packed in zip(accs, summed[2:]):
        if a.dense:
            iu = torch.triu_indices(a.dim, a.dim, device=dev)
            mat = torch.zeros(a.dim, a.dim, dtype=torch.float64, device=dev)
            mat[iu[0], iu[1]] = packed
            a.mat = (mat + mat.triu(1).T).to(a.device)
        else:  # the ranks' bases side by side: C C^T is the sum of their U U^T
            a._basis = packed.permute(1, 0, 2).reshape(a.dim, size * a.rank).to(a.device)
    return summed[0][0]


def fit_kfac(model: BayesianLoRAModel, data: EncodedDataset, config: KFACConfig = KFACConfig(), *,
             values: dict[str, torch.Tensor] | None = None, progress: bool = True,
             generator: torch.Generator | None = None) -> KFACFactors:
    """K-FAC factors of every site of ``model`` at ``values`` (default: the sites' point values,
    i.e. the MAP adapter), over all of ``data``."""
    # one uniform per example, drawn whatever the labels: the sampled labels of an example do not
    # depend on its batch or on the ranks the batches are shared among, nor on a restarted pass
    uniforms = torch.rand(len(data), generator=generator, dtype=torch.float64)
    try:
        return _fit(model, data, config, values, progress, uniforms, share=True)
    except _SharingChanged:  # start again, with the same random labels, without sharing
        return _fit(model, data, config, values, progress, uniforms, share=False)


def _fit(model: BayesianLoRAModel, data: EncodedDataset, config: KFACConfig, values: dict[str, torch.Tensor] | None,
         progress: bool, uniforms: torch.Tensor, share: bool) -> KFACFactors:
    device = model.device
    values = values if values is not None else model.point_values()
    state: dict[str, Any] = {"mask": None, "mean": None, "share": share, "first_batch": True, "inputs": []}
    hooks = [_SiteHooks(s.name, s.module, config, state) for s in model.sites]
    loglik = torch.zeros((), dtype=torch.float64, device=device)
    batches = data.by_length(config.batch_size)
    if len(batches) < ranks.world()[1]:
        raise ValueError(f"K-FAC: {len(batches)} batches of {config.batch_size} for {ranks.world()[1]} processes; "
                         "every process needs at least one (fewer processes or a smaller batch size)")
    changed = False
    try:
        for i, idx in enumerate(tqdm(ranks.shard(batches), desc="k-fac", disable=not progress, leave=False)):
            batch = data.batch(idx, device)
            # the row weights once per batch, not once per site hook (120 of them for SmolLM2)
            # (a cloze batch's [examples, choices, length] is the transformer's rows of [length])
            mask = batch["attention_mask"].reshape(-1, batch["attention_mask"].shape[-1]).float()[:, None, :]
            state.update(mask=mask, mean=mask / mask.sum(2, keepdim=True).clamp_min(1), first_batch=i == 0, inputs=[])
            with torch.enable_grad():
                logits = model.logits_at(batch, {k: v.detach().requires_grad_(True) for k, v in values.items()})
                logp = logits.log_softmax(-1)
                loglik += logp.detach().gather(1, batch["labels"][:, None]).sum()
                if config.fisher == "mc":
                    y = _sampled_labels(logp.detach(), uniforms[idx].to(device))
                else:
                    y = batch["labels"]
                (-logp.gather(1, y[:, None]).sum()).backward()
    except _SharingChanged:
        if ranks.world()[1] == 1:
            raise
        changed = True  # the other ranks learn it below and start again with this one
    finally:
        for h in hooks:
            h.handle.remove()
    loglik = _sum_across_ranks(hooks, loglik, changed)
    # one decomposition per factor, however many sites share it, all at the end
    unique = _unique_requests(hooks)  # after the sum over ranks: the input factors' means use the total counts
    found = dict(zip(unique, decompose(list(unique.values()))))
    total = float(loglik)  # the fit's one host sync besides the decomposition's check
    if not math.isfinite(total):
        raise FloatingPointError("non-finite log-likelihood while collecting K-FAC factors")
    factors = {h.name: (found[id(h.S)], found[id(h.A)]) for h in hooks}
    return KFACFactors(factors, total, len(data), config)
