"""Inference: SVI training loop, schedules, checkpoints."""

from .elbo import MeanFieldELBO
from .checkpoint import find_checkpoint, load_checkpoint, load_params, save_checkpoint, save_params
from .schedules import BlobKLReweighting, ConstantKL, KLSchedule, LinearKLAnnealing, blob_cycle_length, warmup_decay
from .laplace import LaplaceFit, fit_laplace, optimize_prior_precision, prior_precision_of, tune_prior_precision
from .svi import NonFiniteLossError, OptimConfig, SVITrainer
from .scale_search import ScaleSearch, search_scale
from .reprior import PriorSearch, data_precisions, search_prior_precision, variances_at

__all__ = [
    "LaplaceFit", "fit_laplace", "optimize_prior_precision", "prior_precision_of", "tune_prior_precision",
    "BlobKLReweighting", "ConstantKL", "KLSchedule", "LinearKLAnnealing", "MeanFieldELBO", "NonFiniteLossError",
    "OptimConfig", "PriorSearch", "SVITrainer", "ScaleSearch", "data_precisions", "search_prior_precision",
    "variances_at", "blob_cycle_length", "find_checkpoint", "load_checkpoint",
    "load_params", "save_checkpoint", "save_params", "search_scale", "warmup_decay",
]
