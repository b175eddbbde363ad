"""Accuracy, ECE, NLL and Brier score of predictive probabilities.

ECE is torchmetrics' multiclass calibration error (top-label confidence, equal-width bins,
L1 norm), reported in percent; BLoB uses 15 bins (the default here), Laplace-LoRA 10.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = ["Metrics", "compute_metrics"]


@dataclass(frozen=True)
class Metrics:
    accuracy: float  # percent
    ece: float  # percent
    nll: float  # nats per example
    brier: float  # sum over classes, mean over examples
    n: int
    ece_bins: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return f"accuracy {self.accuracy:.2f}%  ECE {self.ece:.2f}%  NLL {self.nll:.4f}  Brier {self.brier:.4f}  (n={self.n})"


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Metrics:
    """Metrics of ``probs`` ``[N, C]`` (rows sum to one) against integer ``labels`` ``[N]``."""
    probs = probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if probs.dim() != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} do not match")
    if not torch.isfinite(probs).all():
        raise ValueError("predictive probabilities contain NaN or inf")
    num_classes = probs.shape[1]
    acc = (probs.argmax(1) == labels).double().mean().item()
    ece = multiclass_calibration_error(probs.float(), labels, num_classes=num_classes, n_bins=n_bins, norm="l1").item()
    nll = -torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).mean().item()
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()
    brier = ((probs - onehot) ** 2).sum(1).mean().item()
    return Metrics(100 * acc, 100 * ece, nll, brier, int(labels.shape[0]), n_bins)
