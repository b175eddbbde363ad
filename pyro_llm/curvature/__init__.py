"""Curvature: Kronecker-factored blocks and K-FAC collection for the LoRA sites."""

from .kfac import FactorAccumulator, KFACConfig, KFACFactors, fit_kfac
from .kron import EigenFactor, KronBlock

__all__ = ["EigenFactor", "FactorAccumulator", "KFACConfig", "KFACFactors", "KronBlock", "fit_kfac"]
