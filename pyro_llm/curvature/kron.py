"""Kronecker-factored Gaussian blocks with (possibly) low-rank eigen-factors.

One block per LoRA matrix ``W`` (``d_out x d_in``). With the row-major flattening ``w = vec_r(W)``,
the gradient of one row is ``vec_r(g a^T) = g (x) a``, so K-FAC gives ``F ~= S (x) A`` with the output
factor ``S = sum g g^T`` (``d_out x d_out``) and the input factor ``A`` (``d_in x d_in``). Each factor is
kept as eigenpairs ``Q diag(e) Q^T`` with ``Q`` of ``k <= d`` orthonormal columns (the large factor
at rank ``n_kfac``); directions outside ``span(Q)`` have eigenvalue 0, so there the precision
``Lambda = S (x) A + lambda I`` is the prior's ``lambda`` alone. Every operation below is exact for
that matrix and costs ``O(d k)``, never ``O(d^2)``; :meth:`KronBlock.to_matrix` is the dense
fallback the tests compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .eig import top_eigenpairs

__all__ = ["EigenFactor", "KronBlock"]


@dataclass
class EigenFactor:
    """``Q diag(eigvals) Q^T`` with ``Q`` of shape ``d x k`` (orthonormal columns)."""

    eigvals: torch.Tensor
    eigvecs: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.eigvecs.shape[0])

    @property
    def rank(self) -> int:
        return int(self.eigvecs.shape[1])

    def to_matrix(self) -> torch.Tensor:
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    @classmethod
    def from_matrix(cls, mat: torch.Tensor, rank: int | None = None) -> "EigenFactor":
        """Top-``rank`` eigenpairs of a symmetric PSD matrix (negative round-off clipped to 0)."""
        k = mat.shape[0] if rank is None else min(rank, mat.shape[0])
        vals, vecs = top_eigenpairs(mat.double(), k)
        return cls(vals.clamp_min(0.0).contiguous(), vecs.contiguous())


@dataclass
class KronBlock:
    """The Laplace posterior block ``N(mean, (S (x) A + lambda I)^-1)`` of one LoRA matrix."""

    mean: torch.Tensor  # d_out x d_in (the MAP)
    S: EigenFactor  # output side, d_out
    A: EigenFactor  # input side, d_in

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    @property
    def numel(self) -> int:
        return self.mean.numel()

    def kron_eigvals(self) -> torch.Tensor:
        """``s_i a_j`` of the kept subspace, ``k_S x k_A``."""
        return self.S.eigvals[:, None] * self.A.eigvals[None, :]

    def logdet_precision(self, prior_precision: torch.Tensor | float) -> torch.Tensor:
        """``log det(S (x) A + lambda I)`` including the ``lambda``-only complement."""
        lam = torch.as_tensor(prior_precision, dtype=torch.float64, device=self.S.eigvals.device)
        kept = self.kron_eigvals()
        return torch.log(kept + lam).sum() + (self.numel - kept.numel()) * torch.log(lam)

    def project(self, M: torch.Tensor) -> torch.Tensor:
        """``Q_S^T M Q_A`` for ``M`` of shape ``... x d_out x d_in``."""
        return self.S.eigvecs.T.to(M.dtype) @ M @ self.A.eigvecs.to(M.dtype)

    def rsample(self, prior_precision: torch.Tensor | float, sample_shape: torch.Size = torch.Size(),
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws: ``mean + E / sqrt(lambda) + Q_S [C (1/sqrt(s a^T + lambda) - 1/sqrt(lambda))] Q_A^T``
        with ``E ~ N(0, I)`` and ``C = Q_S^T E Q_A``."""
        lam = torch.as_tensor(prior_precision, dtype=torch.float64, device=self.mean.device)
        E = torch.randn(tuple(sample_shape) + tuple(self.shape), dtype=torch.float64, device=self.mean.device,
                        generator=generator)
        C = self.project(E)
        scale = torch.rsqrt(self.kron_eigvals() + lam) - torch.rsqrt(lam)
        delta = E * torch.rsqrt(lam) + self.S.eigvecs @ (C * scale) @ self.A.eigvecs.T
        return (self.mean.double() + delta).to(self.mean.dtype)

    def quad_precision(self, D: torch.Tensor, prior_precision: torch.Tensor | float) -> torch.Tensor:
        """``vec(D)^T Lambda vec(D)`` for ``D`` of shape ``... x d_out x d_in``."""
        lam = torch.as_tensor(prior_precision, dtype=torch.float64, device=D.device)
        D = D.double()
        C = self.project(D)
        return lam * D.pow(2).sum((-2, -1)) + (self.kron_eigvals() * C.pow(2)).sum((-2, -1))

    def covariance_weights(self, prior_precision: torch.Tensor) -> torch.Tensor:
        """``1 / (s_i a_j + lambda) - 1 / lambda`` for each ``lambda`` in ``prior_precision`` (shape
        ``L``): ``L x k_S x k_A``. With the Frobenius term ``1 / lambda`` it gives ``J Sigma J^T``."""
        lam = prior_precision.double().reshape(-1, 1, 1)
        return 1.0 / (self.kron_eigvals()[None] + lam) - 1.0 / lam

    def to_matrix(self, prior_precision: float) -> torch.Tensor:
        """The dense precision ``S (x) A + lambda I`` (row-major flattening); tests only."""
        return torch.kron(self.S.to_matrix(), self.A.to_matrix()) + prior_precision * torch.eye(
            self.numel, dtype=torch.float64, device=self.mean.device)

    def log_prob(self, value: torch.Tensor, prior_precision: torch.Tensor | float) -> torch.Tensor:
        D = value.double() - self.mean.double()
        return 0.5 * (self.logdet_precision(prior_precision) - self.quad_precision(D, prior_precision)
                      - self.numel * math.log(2 * math.pi))
