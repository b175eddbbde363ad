"""Reliability diagrams: accuracy against confidence in equal-width bins."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..io import atomic_path

__all__ = ["reliability_bins", "plot_reliability"]


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """Per-bin (mean confidence, accuracy, count) of the top-label prediction."""
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return edges, conf_sum / safe, acc_sum / safe, count


def plot_reliability(curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | os.PathLike,
                     n_bins: int = 15, title: str = "") -> None:
    """Write a PNG with one reliability curve per entry ``label -> (probs, labels)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1.0 / n_bins
    for i, (label, (probs, labels)) in enumerate(curves.items()):
        edges, conf, acc, count = reliability_bins(probs.cpu(), labels.cpu(), n_bins)
        keep = count > 0
        ax.plot(conf[keep].numpy(), acc[keep].numpy(), marker="o", label=label)
        centers = (edges[:-1] + width / 2).numpy()
        axh.bar(centers + (i - (len(curves) - 1) / 2) * width / max(len(curves), 1), count.numpy(),
                width=width / max(len(curves), 1), alpha=0.7, label=label)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    axh.set_xlabel("confidence")
    axh.set_ylabel("count")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)
