"""Predictive distributions, metrics and reliability diagrams."""

from .bootstrap import PairedDifference, paired_bootstrap
from .glm import glm_logit_moments, linearised_predict, mc_probs, probit_probs
from .metrics import Metrics, compute_metrics
from .predictive import mean_logits, predict_proba
from .temperature import apply_temperature, fit_temperature, fit_temperature_to_probs, temper
from .reliability import plot_reliability, reliability_bins

__all__ = ["PairedDifference", "paired_bootstrap", "apply_temperature", "fit_temperature", "fit_temperature_to_probs", "temper", "Metrics", "compute_metrics", "glm_logit_moments", "linearised_predict", "mc_probs", "probit_probs", "mean_logits", "plot_reliability", "predict_proba", "reliability_bins"]
