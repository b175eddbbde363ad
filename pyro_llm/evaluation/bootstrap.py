"""Paired bootstrap intervals: is method A better than method B on the same test examples?

Both predictives are scored on the same examples, so the question is the difference of a metric
computed on the same resample of examples for both: resampling examples with replacement (seeded),
the 2.5 % and 97.5 % quantiles of ``metric(A) - metric(B)`` give a 95 % interval. An interval that
excludes zero means the difference is not an accident of which examples were drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import torch

from .metrics import compute_metrics

__all__ = ["PairedDifference", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """``metric(A) - metric(B)`` on the test set, and its paired-bootstrap 95 % interval."""

    metric: str
    difference: float
    low: float
    high: float
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, *,
                     metrics: tuple[str, ...] = ("accuracy", "ece", "nll", "brier"), resamples: int = 1000,
                     seed: int = 0, n_bins: int = 15) -> dict[str, PairedDifference]:
    """The paired differences ``A - B`` of ``metrics`` (names of :class:`~pyro_llm.evaluation.Metrics`
    fields) with percentile intervals over ``resamples`` seeded resamples of the examples."""
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0]:
        raise ValueError(f"paired predictions must match: {tuple(probs_a.shape)}, {tuple(probs_b.shape)}, "
                         f"labels {tuple(labels.shape)}")

    def diff(i: torch.Tensor | slice) -> list[float]:
        a, b = compute_metrics(probs_a[i], labels[i], n_bins), compute_metrics(probs_b[i], labels[i], n_bins)
        return [float(getattr(a, m)) - float(getattr(b, m)) for m in metrics]

    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.tensor([diff(i) for i in torch.randint(0, n, (resamples, n), generator=gen)], dtype=torch.float64)
    bounds = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    whole = diff(slice(None))
    return {m: PairedDifference(m, whole[k], float(bounds[0, k]), float(bounds[1, k]), resamples)
            for k, m in enumerate(metrics)}
