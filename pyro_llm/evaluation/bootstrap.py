"""Paired bootstrap intervals: is method A better than method B on the same test examples?

Both predictives are scored on the same examples, so the question is the difference of a metric
computed on the same resample of examples for both: resampling examples with replacement (seeded),
the 2.5 % and 97.5 % quantiles of ``metric(A) - metric(B)`` give a 95 % interval. An interval that
excludes zero means the difference is not an accident of which examples were drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

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


#: the metrics a resample is scored on, each a weighted sum over examples (ECE: per confidence bin)
_METRICS = ("accuracy", "ece", "nll", "brier")


def _scores(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``[R, 4]``: accuracy (%), ECE (%), NLL and Brier of ``probs`` on each of ``R`` resamples given
    as example weights ``[R, N]`` (how often each example was drawn), as
    :func:`~pyro_llm.evaluation.compute_metrics` scores the resampled examples (to the float32
    rounding of torchmetrics' ECE, which it computes in float32): a resample's
    metrics are weighted means, and its ECE the weighted sum over torchmetrics' bins of
    ``|sum (confidence - correct)|``, so every resample costs one matrix product, not a pass of its own."""
    probs, labels = probs.detach().double().cpu(), labels.detach().long().cpu()
    confidence, predicted = probs.float().max(dim=1)  # as torchmetrics bins them: float32
    correct = (probs.argmax(1) == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    bins = torch.bucketize(confidence, edges, right=True) - 1  # n_bins + 1 bins: 1.0 has its own
    gap = torch.zeros(len(labels), n_bins + 1, dtype=torch.float64)
    gap[torch.arange(len(labels)), bins] = confidence.double() - (predicted == labels).double()
    nll = -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()
    brier = ((probs - torch.nn.functional.one_hot(labels, probs.shape[1]).double()) ** 2).sum(1)
    total = weights.sum(1, keepdim=True)
    means = weights @ torch.stack([100 * correct, nll, brier], 1) / total
    ece = 100 * (weights @ gap).abs().sum(1, keepdim=True) / total
    return torch.cat([means[:, :1], ece, means[:, 1:]], 1)


def paired_bootstrap(probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, *,
                     metrics: tuple[str, ...] = _METRICS, resamples: int = 1000,
                     seed: int = 0, n_bins: int = 15) -> dict[str, PairedDifference]:
    """The paired differences ``A - B`` of ``metrics`` (any of accuracy, ece, nll, brier) with
    percentile intervals over ``resamples`` seeded resamples of the examples (row ``r`` of
    ``torch.randint(0, N, (resamples, N))`` from a generator seeded with ``seed``)."""
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0]:
        raise ValueError(f"paired predictions must match: {tuple(probs_a.shape)}, {tuple(probs_b.shape)}, "
                         f"labels {tuple(labels.shape)}")
    unknown = [m for m in metrics if m not in _METRICS]
    if unknown:
        raise ValueError(f"paired_bootstrap compares {', '.join(_METRICS)}; got {', '.join(unknown)}")
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=gen)
    weights = torch.zeros(resamples + 1, n, dtype=torch.float64)
    weights[:resamples].scatter_add_(1, draws, torch.ones(resamples, n, dtype=torch.float64))
    weights[resamples] = 1  # the whole test set
    columns = [_METRICS.index(m) for m in metrics]
    diffs = (_scores(probs_a, labels, weights, n_bins) - _scores(probs_b, labels, weights, n_bins))[:, columns]
    bounds = torch.quantile(diffs[:resamples], torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    return {m: PairedDifference(m, float(diffs[resamples, k]), float(bounds[0, k]), float(bounds[1, k]), resamples)
            for k, m in enumerate(metrics)}
