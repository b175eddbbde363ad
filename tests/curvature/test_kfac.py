"""K-FAC: factors against the exact per-example Fisher, low-rank and streamed factors against dense,
shared input factors, and the factor accumulators."""

import pytest
import torch

from linear_models import _grad_outer, laplace_model_of, one_linear_model
from pyro_llm.curvature import FactorAccumulator, KFACConfig, fit_kfac


@pytest.fixture()
def laplace_model(tiny_llama):
    return laplace_model_of(tiny_llama)


@pytest.mark.parametrize("mode", ["reduce", "expand"])
def test_kfac_equals_exact_fisher_for_one_example_on_one_linear_layer(mode):
    model, data = one_linear_model(n=1)
    factors = fit_kfac(model, data, KFACConfig(fisher="empirical", mode=mode, n_kfac=100), progress=False)
    exact = _grad_outer(model, data, 0)
    for name in model.site_names:
        S, A = factors.factors[name]
        torch.testing.assert_close(torch.kron(S.to_matrix(), A.to_matrix()), exact[name], rtol=1e-6, atol=1e-9)


def test_full_rank_low_rank_and_streamed_factors_agree(laplace_model):
    model, data = laplace_model
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    full = fit_kfac(model, data, KFACConfig(n_kfac=1000, mode="expand"), progress=False, generator=gen())
    streamed = fit_kfac(model, data, KFACConfig(n_kfac=1000, mode="expand", dense_threshold=0), progress=False,
                        generator=gen())
    low = fit_kfac(model, data, KFACConfig(n_kfac=4, mode="expand"), progress=False, generator=gen())
    for name in model.site_names:
        for f, s in zip(full.factors[name], streamed.factors[name]):
            torch.testing.assert_close(f.to_matrix(), s.to_matrix(), rtol=1e-6, atol=1e-8)
        S, A = low.factors[name]
        Sf, Af = full.factors[name]
        big, big_full = (A, Af) if A.dim >= S.dim else (S, Sf)
        assert big.rank == 4
        torch.testing.assert_close(big.eigvals, big_full.eigvals[:4], rtol=1e-6, atol=1e-8)


def test_sites_fed_one_input_share_its_factor_exactly(laplace_model):
    """q_proj's and v_proj's A read the same hidden states: one input factor, equal to the ones
    fitted separately; a model that stops sharing after the first batch gets separate factors."""
    from pyro_llm.curvature import kfac as kfac_module

    model, data = laplace_model
    cfg = KFACConfig(n_kfac=3)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shared = fit_kfac(model, data, cfg, progress=False, generator=gen())
    separate = kfac_module._fit(model, data, cfg, None, False, torch.rand(len(data), generator=gen(), dtype=torch.float64),
                                share=False)
    q, v = (n for n in model.site_names if n.endswith("layers.0.self_attn.q_proj.lora_A")
            or n.endswith("layers.0.self_attn.v_proj.lora_A"))
    assert shared.factors[q][1] is shared.factors[v][1]  # decomposed once, for both
    torch.testing.assert_close(shared.factors[q][1].eigvecs, separate.factors[v][1].eigvecs)
    for name in model.site_names:
        for a, b in zip(shared.factors[name], separate.factors[name]):
            torch.testing.assert_close(a.to_matrix(), b.to_matrix(), rtol=1e-6, atol=1e-10)

    calls = {}

    def copy_input_after_first_batch(module, args):
        calls[module] = calls.get(module, 0) + 1
        return (args[0].clone(),) + args[1:] if calls[module] > 1 else None

    layers = [m for n, m in model.peft_model.named_modules() if n.endswith("v_proj") and hasattr(m, "lora_A")]
    handles = [m.register_forward_pre_hook(copy_input_after_first_batch) for m in layers]
    try:
        rerouted = fit_kfac(model, data, cfg, progress=False, generator=gen())
    finally:
        for h in handles:
            h.remove()
    assert max(calls.values()) > 3  # the fit started again after the first batch of the shared one
    for name in model.site_names:
        for a, b in zip(rerouted.factors[name], separate.factors[name]):
            torch.testing.assert_close(a.to_matrix(), b.to_matrix(), rtol=1e-6, atol=1e-10)


def test_accumulator_streams_exactly_when_rank_suffices():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 8, generator=gen, dtype=torch.float64)
    acc = FactorAccumulator(8, rank=3, dense=False, device=torch.device("cpu"))
    for chunk in X.split(7):
        acc.add(chunk, chunk.shape[0])
    torch.testing.assert_close(acc.result(1.0, None).to_matrix(), X.T @ X, rtol=1e-8, atol=1e-8)


def test_dense_accumulator_keeps_rows_until_dim_then_sums():
    """Fewer rows than dim: eigenpairs from the SVD of the rows; past dim: the dense sum. Both
    equal X^T X (and the top-k eigenpairs of it) computed directly."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    for n, keep in ((5, 0), (12, 0), (40, 0), (40, 10 ** 6)):  # rows only, dim rows, past dim (kept or folded)
        acc = FactorAccumulator(12, rank=12, dense=True, device=torch.device("cpu"), keep=keep)
        for chunk in X[:n].split(4):
            acc.add(chunk, chunk.shape[0])
        assert (acc.mat is None) == (n <= 12 or keep > n * 12)
        full = acc.result(0.5, None)
        torch.testing.assert_close(full.to_matrix(), 0.5 * X[:n].T @ X[:n], rtol=1e-10, atol=1e-10)
        top = acc.result(0.5, 3)
        ref = torch.linalg.eigvalsh(0.5 * X[:n].T @ X[:n]).flip(0)[:3]
        torch.testing.assert_close(top.eigvals, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(top.eigvecs.T @ top.eigvecs, torch.eye(3, dtype=torch.float64))
