"""Guides over the LoRA sites: BLoB, Laplace, and Pyro's autoguides by name."""

from .blob import BLoBGuide
from .factory import GUIDES, guide_median, guide_sample, make_guide, param_names_of

__all__ = ["BLoBGuide", "GUIDES", "guide_median", "guide_sample", "make_guide", "param_names_of"]
