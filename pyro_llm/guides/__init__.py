"""Guides over the LoRA sites: BLoB, IVON and Laplace, the parameter-role protocol, and the operations
every guide (Pyro's autoguides included) supports. Guides by name are the run layer's registry
(:mod:`pyro_llm.runs.registry`)."""

from .blob import BLoBGuide
from .ivon import IVONGuide, IVONOptimizer
from .laplace import KroneckerNormal, LaplaceGuide
from .ops import ReportsScales, guide_median, guide_sample, scale_summary, write_back_means
from .roles import DeclaresParamGroups, OwnsOptimizer, param_roles

__all__ = ["BLoBGuide", "DeclaresParamGroups", "IVONGuide", "IVONOptimizer", "KroneckerNormal", "LaplaceGuide",
           "OwnsOptimizer", "ReportsScales", "guide_median", "guide_sample", "param_roles", "scale_summary",
           "write_back_means"]
