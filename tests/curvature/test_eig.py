"""The top-k eigensolver against dense ``torch.linalg.eigh``."""

import pytest
import torch

from pyro_llm.curvature.eig import top_eigenpairs


def _psd(d: int, n: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=g) * torch.logspace(0, -decay, d, dtype=torch.float64)
    return X.T @ X


@pytest.mark.parametrize("d,n,decay", [(200, 500, 2.0), (300, 40, 1.0), (256, 1000, 0.3)])
def test_top_eigenpairs_match_dense(d: int, n: int, decay: float) -> None:
    M = _psd(d, n, decay, seed=d)
    k = 10
    vals, vecs = top_eigenpairs(M, k)
    ref_vals, ref_vecs = torch.linalg.eigh(M)
    ref_vals, ref_vecs = ref_vals.flip(0)[:k], ref_vecs.flip(1)[:, :k]
    torch.testing.assert_close(vals, ref_vals, rtol=1e-8, atol=1e-8 * float(ref_vals[0]))
    # eigenvectors up to sign: the projectors agree
    torch.testing.assert_close(vecs @ vecs.T, ref_vecs @ ref_vecs.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


def test_rank_deficient_and_zero_matrices() -> None:
    M = _psd(200, 3, 0.0, seed=1)  # rank 3 < k
    vals, vecs = top_eigenpairs(M, 10)
    assert vals.shape == (10,) and vecs.shape == (200, 10)
    torch.testing.assert_close(vals[:3], torch.linalg.eigvalsh(M).flip(0)[:3])
    assert float(vals[3:].abs().max()) <= 1e-8 * float(vals[0])
    zero_vals, _ = top_eigenpairs(torch.zeros(200, 200, dtype=torch.float64), 5)
    assert float(zero_vals.abs().max()) == 0.0
