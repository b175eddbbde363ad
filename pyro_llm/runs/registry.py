"""Names to objects: the one place where the run layer and the CLI turn strings into guides, priors,
ELBOs, KL schedules and Laplace predictives. The CLI's choices are the keys of these tables, so a
name added here is a name the command line accepts; the library below never dispatches on strings.

A researcher's own guide needs no entry: build the model, pass any guide object to
:class:`~pyro_llm.infer.SVITrainer` (README, "Swap a guide or a prior"). An entry makes it a
``--guide`` choice::

    GUIDES["lowrank"] = GuideEntry(lambda model, opts: AutoLowRankMultivariateNormal(model, rank=4),
                                   help="...", flipout=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal

from ..guides import BLoBGuide
from ..infer.elbo import MeanFieldELBO
from ..infer.schedules import BlobKLReweighting, ConstantKL, KLSchedule, LinearKLAnnealing, blob_cycle_length
from ..models.model import BayesianLoRAModel
from ..priors import GaussianPrior, LaplacePrior, Prior, StudentTPrior

__all__ = ["ELBOS", "GUIDES", "GuideEntry", "KL_SCHEDULES", "PREDICTIVES", "PRIORS", "lookup", "make_guide"]


@dataclass(frozen=True)
class GuideEntry:
    """How to build a named guide, and what it is.

    :param build: ``build(model, options) -> guide``, ``options`` the run's guide options
        (``blob_eps``, ``sigma_param``, ``normal_init_scale``, ...).
    :param flipout: its LoRA sites' marginals are Normal, so Flipout applies (the default of
        ``--flipout``); elsewhere Flipout would only warn.
    :param point: a point estimate (MAP): every weight sample is the same network.
    """

    build: Callable[[BayesianLoRAModel, dict[str, Any]], Any]
    help: str
    flipout: bool = True
    point: bool = False


GUIDES: dict[str, GuideEntry] = {
    "map": GuideEntry(lambda m, o: AutoDelta(m, init_loc_fn=m.init_loc_fn()),
                      "Pyro's AutoDelta: MAP of A and B (a Gaussian prior is weight decay)", flipout=False, point=True),
    "normal": GuideEntry(lambda m, o: AutoNormal(m, init_loc_fn=m.init_loc_fn(), init_scale=o.get("normal_init_scale", 0.01)),
                         "Pyro's AutoNormal: mean-field Gaussian, softplus scales (Flipout and closed-form KL)"),
    "blob": GuideEntry(lambda m, o: BLoBGuide(m, eps=o.get("blob_eps", 0.05), sigma_param=o.get("sigma_param", "square")),
                       "BLoBGuide: mean-field Gaussian, sigma = G^2"),
    "lowrank": GuideEntry(lambda m, o: AutoLowRankMultivariateNormal(m, init_loc_fn=m.init_loc_fn(),
                                                                     init_scale=o.get("normal_init_scale", 0.01)),
                          "Pyro's AutoLowRankMultivariateNormal: a joint Gaussian of rank 1 + diagonal (sampled KL)",
                          flipout=False),
}

#: ``--prior NAME`` with ``--prior-scale``: ``PRIORS[name](scale)``.
PRIORS: dict[str, Callable[[float], Prior]] = {
    "gaussian": GaussianPrior, "laplace": LaplacePrior, "student-t": lambda s: StudentTPrior(3.0, s)}

#: ``--elbo NAME``: ``ELBOS[name]()``.
ELBOS: dict[str, Callable[[], ELBO]] = {"meanfield": MeanFieldELBO, "trace": Trace_ELBO}


@dataclass(frozen=True)
class KLScheduleArgs:
    weight: float = 1.0
    anneal_steps: int = 0
    dataset_size: int = 1
    batch_size: int = 1
    blob_gamma: float = 8.0
    steps: int = 1
    cycles: int = 4


#: ``--kl-schedule NAME``: ``KL_SCHEDULES[name](KLScheduleArgs)``.
KL_SCHEDULES: dict[str, Callable[[KLScheduleArgs], KLSchedule]] = {
    "constant": lambda a: ConstantKL(a.weight),
    "linear": lambda a: LinearKLAnnealing(a.anneal_steps, 0.0, a.weight),
    # the BLoB reference's Llama recipe: M by dataset rescaling, M = int(100 N^(pi/gamma) / B)
    "blob": lambda a: BlobKLReweighting(a.dataset_size, blob_cycle_length(a.dataset_size, a.batch_size, a.blob_gamma)),
    # Blundell et al.'s original: one cycle per epoch, M = N // B
    "blob-epoch": lambda a: BlobKLReweighting(a.dataset_size, max(a.dataset_size // a.batch_size, 1)),
    # the same reweighting with cycles that complete within the planned length: M = steps // cycles
    "blob-cycles": lambda a: BlobKLReweighting(a.dataset_size, max(a.steps // max(a.cycles, 1), 1)),
}

#: Laplace predictives (``pyro-llm laplace --predictive``): linearised + probit, linearised + Monte
#: Carlo over logits, weight samples through the network, the MAP alone.
PREDICTIVES: dict[str, str] = {"glm": "linearised, probit", "glm-mc": "linearised, Monte Carlo over logits",
                               "nn": "weight samples through the network", "map": "the MAP alone"}


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    """``table[name]``, or a clear error listing the choices."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def make_guide(name: str, model: BayesianLoRAModel, **options: Any) -> Any:
    """The registered guide ``name`` over ``model``."""
    return lookup(GUIDES, name, "guide").build(model, options)


