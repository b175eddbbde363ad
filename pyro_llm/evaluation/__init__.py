"""Predictive distributions, metrics and reliability diagrams."""

from .metrics import Metrics, compute_metrics
from .predictive import mean_logits, predict_proba
from .reliability import plot_reliability, reliability_bins

__all__ = ["Metrics", "compute_metrics", "mean_logits", "plot_reliability", "predict_proba", "reliability_bins"]
