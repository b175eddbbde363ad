"""Top-``k`` eigenpairs of a symmetric PSD matrix, without a full eigendecomposition when ``k << d``.

Laplace-LoRA keeps only the ``n_kfac`` (10) leading eigenpairs of each large K-FAC factor. A full
``torch.linalg.eigh`` of a ``d x d`` factor costs ``O(d^3)``, and a model has one such factor per
LoRA matrix (hundreds of thousands of entries each on a hidden size in the thousands), comparable
to the K-FAC pass's forward and backward itself. Block subspace
iteration with Rayleigh-Ritz extraction (Saad, *Numerical Methods for Large Eigenvalue
Problems*, ch. 5) costs ``O(d^2 p)`` per iteration for a block of ``p ~ 2k`` vectors and, on the
fast-decaying spectra of activation and gradient covariances, converges in a handful of
iterations. Convergence is checked on the residuals ``||M v - theta v||`` of the wanted pairs;
if they do not converge within ``max_iter`` iterations the dense ``eigh`` answers instead, so
the result is always accurate to ``tol``.
"""

from __future__ import annotations

import torch

__all__ = ["top_eigenpairs"]


def _dense(mat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(mat)
    return vals.flip(0)[:k], vecs.flip(1)[:, :k]


def top_eigenpairs(mat: torch.Tensor, k: int, *, tol: float = 1e-10, max_iter: int = 60,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (descending) and their eigenvectors (columns) of ``mat``.

    ``mat`` must be symmetric (PSD for the convergence argument). The residual of every returned
    pair is at most ``tol * ||mat||_2``; the start block is drawn from a fixed ``seed``, so the
    result is deterministic. Dense ``eigh`` is used when ``k`` is not small against ``d``.
    """
    d = mat.shape[0]
    k = min(k, d)
    p = min(d, 2 * k + 8)
    if 4 * p >= d:
        return _dense(mat, k)
    gen = torch.Generator(device=mat.device).manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, p, dtype=mat.dtype, device=mat.device, generator=gen))
    for _ in range(max_iter):
        Z = mat @ Q
        # Rayleigh-Ritz on span(Q): the best approximations to eigenpairs that the block holds
        theta, W = torch.linalg.eigh(Q.T @ Z)
        theta, W = theta.flip(0), W.flip(1)
        V = Q @ W
        R = Z @ W - V * theta  # residuals M v - theta v of every Ritz pair
        scale = theta[0].abs().clamp_min(torch.finfo(mat.dtype).tiny)
        if bool((torch.linalg.vector_norm(R[:, :k], dim=0) <= tol * scale).all()):
            return theta[:k].contiguous(), V[:, :k].contiguous()
        Q, _ = torch.linalg.qr(Z @ W)
    return _dense(mat, k)
