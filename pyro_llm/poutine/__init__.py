"""Effect handlers: Flipout over the LoRA product and KL weighting of latent sites."""

from .flipout import FlipoutMessenger, FlipoutNotApplied, flipout, flipout_product, rademacher
from .kl_weight import KLWeightMessenger, kl_weight

__all__ = ["FlipoutMessenger", "FlipoutNotApplied", "KLWeightMessenger", "flipout", "flipout_product", "kl_weight", "rademacher"]
