"""Inference: SVI training loop, schedules, checkpoints."""

from .elbo import MeanFieldELBO
from .checkpoint import find_checkpoint, load_checkpoint, load_params, save_checkpoint, save_params
from .schedules import (BlobKLReweighting, ConstantKL, KLSchedule, LinearKLAnnealing, make_kl_schedule,
                        warmup_decay)
from .svi import NonFiniteLossError, OptimConfig, SVITrainer, make_elbo

__all__ = [
    "BlobKLReweighting", "ConstantKL", "KLSchedule", "LinearKLAnnealing", "MeanFieldELBO", "NonFiniteLossError",
    "OptimConfig", "SVITrainer", "find_checkpoint", "load_checkpoint", "load_params", "make_elbo",
    "make_kl_schedule", "save_checkpoint", "save_params", "warmup_decay",
]
