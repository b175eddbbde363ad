"""Guides over the LoRA sites: BLoB, Laplace, and Pyro's autoguides by name."""

from .blob import BLoBGuide
from .laplace import KroneckerNormal, LaplaceGuide
from .factory import GUIDES, guide_median, guide_sample, make_guide

__all__ = ["BLoBGuide", "KroneckerNormal", "LaplaceGuide", "GUIDES", "guide_median", "guide_sample", "make_guide"]
