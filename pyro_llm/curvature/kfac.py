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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checks import check_int
from ..data.collate import EncodedDataset
from ..models.model import BayesianLoRAModel
from .kron import EigenFactor

__all__ = ["KFACConfig", "KFACFactors", "FactorAccumulator", "fit_kfac"]


@dataclass(frozen=True)
class KFACConfig:
    fisher: str = "mc"  # "mc" (labels sampled from the model) or "empirical" (true labels)
    mode: str = "reduce"  # "reduce" or "expand"
    n_kfac: int = 10
    dense_threshold: int = 4096
    batch_size: int = 4

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

    Dense accumulation keeps the rows themselves while there are fewer of them than ``dim``
    (K-FAC "reduce" on a few hundred prompts: one row per prompt against ``d = 576``): the
    eigenpairs then come from a thin SVD of the ``n x d`` rows, exactly, at ``O(n^2 d)`` instead
    of a ``d x d`` product per batch and a ``d x d`` eigenproblem. Past ``dim`` rows the ``d x d``
    sum is formed and kept as before.
    """

    def __init__(self, dim: int, rank: int, dense: bool, device: torch.device) -> None:
        self.dim, self.rank, self.dense = dim, min(rank, dim), dense
        self.count = 0
        self._results: dict[tuple[float, int | None], EigenFactor] = {}
        self.device = device
        self.mat: torch.Tensor | None = None  # the dense d x d sum, once formed
        self.rows: list[torch.Tensor] = []  # dense mode, before the sum is formed
        self.num_rows = 0
        self.basis = torch.zeros(dim, 0, dtype=torch.float64, device=device)  # columns U with U U^T ~ sum

    def add(self, rows: torch.Tensor, count: int) -> None:
        rows = rows.double()
        self.count += count
        if rows.shape[0] == 0:
            return
        if self.dense:
            if self.mat is None and self.num_rows + rows.shape[0] <= self.dim:
                self.rows.append(rows)
                self.num_rows += rows.shape[0]
                return
            if self.mat is None:
                self.mat = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
                for kept in self.rows:
                    self.mat.addmm_(kept.T, kept)
                self.rows = []
            self.mat.addmm_(rows.T, rows)
            return
        stacked = _finite(torch.cat([self.basis, rows.T], dim=1))
        U, sv, _ = torch.linalg.svd(stacked, full_matrices=False)
        k = min(self.rank, sv.shape[0])
        self.basis = U[:, :k] * sv[:k]

    def same_kind(self, other: "FactorAccumulator") -> bool:
        return (self.dim, self.rank, self.dense) == (other.dim, other.rank, other.dense)

    def result(self, scale: float, rank: int | None) -> EigenFactor:
        """The eigen-factor of ``scale * sum x x^T`` (computed once per ``(scale, rank)``)."""
        key = (scale, rank)
        if key not in self._results:
            self._results[key] = self._result(scale, rank)
        return self._results[key]

    def _result(self, scale: float, rank: int | None) -> EigenFactor:
        rank = rank or self.rank
        if self.dense and self.mat is not None:
            return EigenFactor.from_matrix(self.mat * scale, rank)
        if self.dense:  # fewer rows than dim: R^T R = C C^T with C = R^T
            columns = _finite(torch.cat(self.rows).T) if self.rows else self.basis
            return _gram_eigen(columns, scale, rank)
        return _gram_eigen(self.basis, scale, rank)


def _finite(t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise FloatingPointError("non-finite activations or gradients while collecting K-FAC factors")
    return t


def _gram_eigen(columns: torch.Tensor, scale: float, rank: int) -> EigenFactor:
    """The top-``rank`` eigenpairs of ``scale * C C^T`` for ``C`` of shape ``d x m``, exactly, from
    the thin SVD of ``C`` (``C = U S V^T`` gives eigenvectors ``U`` and eigenvalues ``S^2``)."""
    if columns.shape[1] == 0:
        return EigenFactor(torch.zeros(0, dtype=columns.dtype, device=columns.device), columns)
    U, sv, _ = torch.linalg.svd(columns, full_matrices=False)
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

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.state["mask"]
        if x.dim() == 3 and mask is not None and mask.shape == x.shape[:2]:
            return mask.to(x.dtype)
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device).reshape(x.shape[0], -1)

    def _forward(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        x = inputs[0]
        mask = self._mask(x)
        output.register_hook(lambda g, m=mask: self._backward(g, m))
        if self._shares_input(x):
            return
        x = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        if self.cfg.mode == "reduce":  # masked mean over positions as one batched product
            lengths = mask.sum(1, keepdim=True).clamp_min(1)
            rows = torch.bmm(mask[:, None, :], x).squeeze(1) / lengths
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
            rows = torch.bmm(mask.to(g.dtype)[:, None, :], g).squeeze(1)
        else:
            rows = g.reshape(-1, g.shape[-1])[mask.reshape(-1) > 0]
        self.S.add(rows, rows.shape[0])

    def result(self) -> tuple[EigenFactor, EigenFactor]:
        # S is a sum over examples/tokens, A a mean (see the module docstring)
        A = self.A.result(1.0 / max(self.A.count, 1), None)
        if self.owner is not None:  # its own tensors: saved factors never share memory
            A = EigenFactor(A.eigvals.clone(), A.eigvecs.clone())
        return self.S.result(1.0, None), A


def fit_kfac(model: BayesianLoRAModel, data: EncodedDataset, config: KFACConfig = KFACConfig(), *,
             values: dict[str, torch.Tensor] | None = None, progress: bool = True,
             generator: torch.Generator | None = None) -> KFACFactors:
    """K-FAC factors of every site of ``model`` at ``values`` (default: the sites' point values,
    i.e. the MAP adapter), over all of ``data``."""
    device = model.device
    rng = generator.get_state() if generator is not None else torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if generator is None and device.type == "cuda" else None
    try:
        return _fit(model, data, config, values, progress, generator, share=True)
    except _SharingChanged:  # start again, with the same random labels, without sharing
        if generator is not None:
            generator.set_state(rng)
        else:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
        return _fit(model, data, config, values, progress, generator, share=False)


def _fit(model: BayesianLoRAModel, data: EncodedDataset, config: KFACConfig, values: dict[str, torch.Tensor] | None,
         progress: bool, generator: torch.Generator | None, share: bool) -> KFACFactors:
    device = model.device
    values = values if values is not None else model.point_values()
    state: dict[str, Any] = {"mask": None, "share": share, "first_batch": True, "inputs": []}
    hooks = [_SiteHooks(s.name, s.module, config, state) for s in model.sites]
    loglik = 0.0
    try:
        for i, idx in enumerate(tqdm(list(data.sequential(config.batch_size)), desc="k-fac", disable=not progress,
                                     leave=False)):
            batch = data.batch(idx, device)
            # the mask as float once per batch, not once per site hook (120 of them for SmolLM2)
            state.update(mask=batch["attention_mask"].float(), first_batch=i == 0, inputs=[])
            with torch.enable_grad():
                logits = model.logits_at(batch, {k: v.detach().requires_grad_(True) for k, v in values.items()})
                logp = logits.log_softmax(-1)
                loglik += float(logp.detach().gather(1, batch["labels"][:, None]).sum())
                if config.fisher == "mc":
                    y = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
                else:
                    y = batch["labels"]
                nll = -logp.gather(1, y[:, None]).sum()
                if not torch.isfinite(nll):
                    raise FloatingPointError("non-finite log-likelihood while collecting K-FAC factors")
                nll.backward()
    finally:
        for h in hooks:
            h.handle.remove()
    return KFACFactors({h.name: h.result() for h in hooks}, loglik, len(data), config)
