"""Names to objects: the one place where the run layer and the CLI turn strings into guides, priors,
ELBOs, KL schedules and Laplace predictives. The library below never dispatches on strings.

A name is found, in order, among the built-in entries of a table; among the entries that installed
packages declare in the entry-point group of that table (``pyro_llm.guides``, ``pyro_llm.priors``,
``pyro_llm.kl_schedules``); or, written ``package.module:attribute``, by importing it. So a
researcher's guide trains from the command line without any change here::

    pyro-llm svi-train --guide mypackage.guides:MyGuide ...

    # or, in the plugin's pyproject.toml:
    [project.entry-points."pyro_llm.guides"]
    myguide = "mypackage.guides:MyGuide"       # then: pyro-llm svi-train --guide myguide

A guide plugin is a :class:`GuideEntry` or a callable ``factory(model) -> guide`` (a guide class);
a prior plugin a callable ``factory(scale) -> prior`` (``--prior-scale`` is passed); a KL schedule
plugin a callable ``factory(KLScheduleArgs) -> schedule``. In Python no entry is needed at all:
pass any guide object to :class:`~pyro_llm.infer.SVITrainer`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal

from ..guides import BLoBGuide, IVONGuide
from ..infer.elbo import MeanFieldELBO
from ..infer.schedules import BlobKLReweighting, ConstantKL, KLSchedule, LinearKLAnnealing, blob_cycle_length
from ..models.model import BayesianLoRAModel
from ..priors import GaussianPrior, HierarchicalGaussianPrior, LaplacePrior, Prior, StudentTPrior

__all__ = ["ELBOS", "GUIDES", "GuideEntry", "KLScheduleArgs", "KL_SCHEDULES", "PLUGIN_GROUPS", "PREDICTIVES",
           "PRIORS", "lookup", "make_guide", "names"]


@dataclass(frozen=True)
class GuideEntry:
    """How to build a named guide, and what it is.

    :param build: ``build(model, options) -> guide``, ``options`` the run's guide options
        (:attr:`~pyro_llm.runs.GuideConfig.options`: ``blob_eps``, ``sigma_param``, ``normal_init_scale``,
        ``ivon_ess``, ``ivon_hess_init``, ``ivon_beta2``, ``ivon_clip_radius``, ``ivon_rescale_lr``).
    :param flipout: the default of ``--flipout``: ``True`` where its LoRA sites' marginals are
        Normal; ``None`` lets the trainer apply Flipout wherever it can, silently elsewhere.
    :param point: a point estimate (MAP): every weight sample is the same network.
    """

    build: Callable[[BayesianLoRAModel, dict[str, Any]], Any]
    help: str
    flipout: bool | None = True
    point: bool = False


GUIDES: dict[str, GuideEntry] = {
    "map": GuideEntry(lambda m, o: AutoDelta(m, init_loc_fn=m.init_loc_fn()),
                      "Pyro's AutoDelta: MAP of A and B (a Gaussian prior is weight decay)", flipout=False, point=True),
    "normal": GuideEntry(lambda m, o: AutoNormal(m, init_loc_fn=m.init_loc_fn(), init_scale=o["normal_init_scale"]),
                         "Pyro's AutoNormal: mean-field Gaussian, softplus scales (Flipout and closed-form KL)"),
    "blob": GuideEntry(lambda m, o: BLoBGuide(m, eps=o["blob_eps"], sigma_param=o["sigma_param"]),
                       "BLoBGuide: mean-field Gaussian, sigma = G^2"),
    "ivon": GuideEntry(lambda m, o: IVONGuide(m, ess=o["ivon_ess"], hess_init=o["ivon_hess_init"],
                                              beta2=o["ivon_beta2"], rescale_lr=o["ivon_rescale_lr"],
                                              clip_radius=o["ivon_clip_radius"] or math.inf),
                       "IVONGuide: mean-field Gaussian whose scales come from IVON's Hessian estimate (its own "
                       "optimiser at --lr; the prior is its weight decay)"),
    "lowrank": GuideEntry(lambda m, o: AutoLowRankMultivariateNormal(m, init_loc_fn=m.init_loc_fn(),
                                                                     init_scale=o["normal_init_scale"]),
                          "Pyro's AutoLowRankMultivariateNormal: a joint Gaussian of rank 1 + diagonal (sampled KL)",
                          flipout=False),
}

#: ``--prior NAME`` with ``--prior-scale``: ``PRIORS[name](scale)``.
PRIORS: dict[str, Callable[[float], Prior]] = {
    "gaussian": GaussianPrior, "laplace": LaplacePrior, "student-t": lambda s: StudentTPrior(3.0, s),
    "hierarchical": HierarchicalGaussianPrior}

#: ``--elbo NAME``: ``ELBOS[name]()``.
ELBOS: dict[str, Callable[[], ELBO]] = {"meanfield": MeanFieldELBO, "trace": Trace_ELBO}


@dataclass(frozen=True)
class KLScheduleArgs:
    """What a KL schedule may depend on: the run's KL options, data and length."""

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

#: The tables that plugins extend, by entry-point group.
PLUGIN_GROUPS: dict[str, dict[str, Any]] = {"pyro_llm.guides": GUIDES, "pyro_llm.priors": PRIORS,
                                            "pyro_llm.kl_schedules": KL_SCHEDULES}
_loaded: set[str] = set()


def _as_entry(table: dict[str, Any], obj: Any, name: str) -> Any:
    """A plugin object as an entry of ``table``: a guide class or factory becomes a :class:`GuideEntry`."""
    if table is GUIDES and not isinstance(obj, GuideEntry):
        if not callable(obj):
            raise TypeError(f"guide plugin {name!r} is {obj!r}: expected a GuideEntry or a callable factory(model)")
        return GuideEntry(lambda m, o, f=obj: f(m), f"{name} (user code)", flipout=None)
    if not callable(obj):
        raise TypeError(f"plugin {name!r} is {obj!r}: expected a callable factory")
    return obj


def _load_entry_points(table: dict[str, Any]) -> None:
    for group, target in PLUGIN_GROUPS.items():
        if target is table and group not in _loaded:
            _loaded.add(group)
            for ep in entry_points(group=group):
                if ep.name not in table:
                    table[ep.name] = _as_entry(table, ep.load(), ep.name)


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r} ({type(err).__name__}: {err})") from None
    return obj


def _pluggable(table: dict[str, Any]) -> bool:
    return any(table is t for t in PLUGIN_GROUPS.values())


def names(table: dict[str, Any]) -> list[str]:
    """The names ``table`` answers to: built-in entries and installed plugins."""
    _load_entry_points(table)
    return list(table)


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    """``table[name]`` (a built-in entry, an installed plugin, or ``module:attribute`` imported), or a
    clear error listing the choices."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a name, got {name!r}")
    if name in table:
        return table[name]
    if _pluggable(table):
        _load_entry_points(table)
        if name in table:
            return table[name]
        if ":" in name:
            table[name] = _as_entry(table, _import(name), name)
            return table[name]
    extra = " or package.module:Attribute" if _pluggable(table) else ""
    raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}{extra}")


def make_guide(name: str, model: BayesianLoRAModel, **options: Any) -> Any:
    """The registered guide ``name`` over ``model``."""
    return lookup(GUIDES, name, "guide").build(model, options)
