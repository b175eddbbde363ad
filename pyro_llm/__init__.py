"""pyro-llm: Bayesian LoRA fine-tuning of language models as Pyro models.

A method is a model (:class:`~pyro_llm.models.BayesianLoRAModel`, LoRA ``A`` matrices as
sample sites), a prior (:mod:`pyro_llm.priors`) and a guide (:mod:`pyro_llm.guides`: BLoB,
Laplace, or Pyro's autoguides), joined by inference (:mod:`pyro_llm.infer`, SVI or the
Laplace fit) and judged by :mod:`pyro_llm.evaluation`. Runs, their configuration, the registry of
names and the CLI sit on top (:mod:`pyro_llm.runs`, :mod:`pyro_llm.cli`); nothing below imports them.
"""

__version__ = "0.1.0"

from .guides import BLoBGuide, LaplaceGuide  # noqa: E402
from .models import BayesianLoRAModel, build_model  # noqa: E402
from .poutine import flipout, kl_weight  # noqa: E402
from .priors import GaussianPrior, HierarchicalGaussianPrior, LaplacePrior, SitePrior, StudentTPrior  # noqa: E402

__all__ = [
    "BLoBGuide", "BayesianLoRAModel", "GaussianPrior", "HierarchicalGaussianPrior", "LaplaceGuide", "LaplacePrior", "SitePrior",
    "StudentTPrior", "__version__", "build_model", "flipout", "kl_weight",
]
