"""Laplace-LoRA's posterior as a Pyro guide (Yang et al. 2024, ``algorithms.md`` §2).

For each site ``W`` (LoRA ``A`` and ``B`` by default) the guide samples
``N(W*, (S (x) A + lambda I)^-1)`` exactly through the factors' eigenbases
(:class:`~pyro_llm.curvature.kron.KronBlock`), including the prior-only complement of the
low-rank factor. It is an ordinary guide over the model's sites, so ``pyro.infer.Predictive``
and :func:`pyro_llm.evaluation.predict_proba` (the sampled, "NN" predictive) work with it; the
linearised predictive is in :mod:`pyro_llm.evaluation.glm`.

``prior_precision`` is a scalar (one ``lambda``) or one value per site (layer-wise), tuned by
:mod:`pyro_llm.infer.laplace`. Saved and loaded with safetensors.

Usage::

    guide = fit_laplace(model, train_data, guide=map_guide).guide   # K-FAC + marginal-likelihood lambda
    probs = predict_proba(model, guide, test_data, num_samples=10)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ..curvature.kron import EigenFactor, KronBlock
from ..io import atomic_save_tensors, load_tensors
from ..models.model import BayesianLoRAModel

__all__ = ["KroneckerNormal", "LaplaceGuide"]


class KroneckerNormal(dist.TorchDistribution):
    """Matrix normal with precision ``S (x) A + lambda I`` (low-rank eigen-factors), event shape
    ``d_out x d_in``; ``rsample`` is exact and ``log_prob`` is the exact Gaussian density."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, block: KronBlock, prior_precision: torch.Tensor | float, batch_shape: torch.Size = torch.Size(),
                 validate_args: Any = None) -> None:
        self.block = block
        self.prior_precision = torch.as_tensor(prior_precision, dtype=torch.float64)
        super().__init__(batch_shape=torch.Size(batch_shape), event_shape=block.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.block.mean.expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Independent exact draws for every entry of ``sample_shape + batch_shape`` (the batch
        shape a vectorised plate gives, ``Predictive(parallel=True)``)."""
        return self.block.rsample(self.prior_precision, torch.Size(sample_shape) + self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.block.log_prob(value, self.prior_precision).to(value.dtype)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> "KroneckerNormal":
        return KroneckerNormal(self.block, self.prior_precision, torch.Size(batch_shape))


class LaplaceGuide:
    """A Pyro guide: ``pyro.sample(site, KroneckerNormal(block, lambda_site))`` for every site."""

    def __init__(self, model: BayesianLoRAModel, blocks: dict[str, KronBlock],
                 prior_precision: torch.Tensor | float = 1.0) -> None:
        missing = [s for s in model.site_names if s not in blocks]
        if missing:
            raise ValueError(f"no Laplace block for sites {missing[:3]}")
        self.model = model
        self.blocks = blocks
        self.set_prior_precision(prior_precision)

    def set_prior_precision(self, prior_precision: torch.Tensor | float) -> None:
        """A scalar, or one value per site in the model's site order."""
        lam = torch.as_tensor(prior_precision, dtype=torch.float64).detach().cpu()
        if lam.numel() not in (1, len(self.model.sites)) or not (lam > 0).all():
            raise ValueError(f"prior precision must be positive, scalar or one per site ({len(self.model.sites)})")
        self.prior_precision = lam

    def site_precision(self, i: int) -> torch.Tensor:
        return self.prior_precision.reshape(-1)[0 if self.prior_precision.numel() == 1 else i]

    def distribution(self, name: str) -> KroneckerNormal:
        i = self.model.site_names.index(name)
        return KroneckerNormal(self.blocks[name], self.site_precision(i).to(self.blocks[name].mean.device))

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {name: pyro.sample(name, self.distribution(name)) for name in self.model.site_names}

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {name: self.blocks[name].mean for name in self.model.site_names}

    # -- evidence ---------------------------------------------------------------------------------
    def log_marginal_likelihood(self, log_likelihood: float | torch.Tensor,
                                prior_precision: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(D|W*) - sum_b lambda_b/2 ||W*_b||^2 + sum_b P_b/2 log lambda_b - 1/2 log det Lambda``
        (``algorithms.md`` §2; the 2 pi terms cancel). Differentiable in ``prior_precision``."""
        lam = self.prior_precision if prior_precision is None else prior_precision
        lam = lam.reshape(-1)
        total = torch.as_tensor(log_likelihood, dtype=torch.float64)
        for i, name in enumerate(self.model.site_names):
            block = self.blocks[name]
            li = lam[0 if lam.numel() == 1 else i].to(block.mean.device)
            total = total + (-0.5 * li * block.mean.double().pow(2).sum() + 0.5 * block.numel * torch.log(li)
                             - 0.5 * block.logdet_precision(li)).cpu()
        return total

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors: dict[str, torch.Tensor] = {"prior_precision": self.prior_precision}
        for name, b in self.blocks.items():
            tensors.update({f"{name}/mean": b.mean, f"{name}/S.eigvals": b.S.eigvals, f"{name}/S.eigvecs": b.S.eigvecs,
                            f"{name}/A.eigvals": b.A.eigvals, f"{name}/A.eigvecs": b.A.eigvecs})
        atomic_save_tensors(path, tensors, {"format": "pyro-llm-laplace-v1"})

    @classmethod
    def load(cls, model: BayesianLoRAModel, path: str | Path) -> "LaplaceGuide":
        t = load_tensors(path, device=model.device)
        blocks = {}
        for name in model.site_names:
            try:
                blocks[name] = KronBlock(t[f"{name}/mean"], EigenFactor(t[f"{name}/S.eigvals"], t[f"{name}/S.eigvecs"]),
                                         EigenFactor(t[f"{name}/A.eigvals"], t[f"{name}/A.eigvecs"]))
            except KeyError as err:
                raise ValueError(f"{path} has no Laplace factors for site {name!r}") from err
        return cls(model, blocks, t["prior_precision"].cpu())


