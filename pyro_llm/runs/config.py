"""The resolved configuration of a run, saved as ``config.json`` beside its weights: an SVI run's
:class:`RunConfig` (sections for the model, data, LoRA (the library's own
:class:`~pyro_llm.models.LoRAOptions`), prior, guide, objective, optimiser
(:class:`~pyro_llm.infer.OptimConfig`) and evaluation) and a Laplace run's :class:`LaplaceConfig`
(with the K-FAC pass's :class:`~pyro_llm.curvature.KFACConfig` nested). The command line builds
these objects and takes its defaults from them; the Python API gets the same checks.
Names (guide, prior, ELBO, KL schedule, predictive) are checked against :mod:`.registry`."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..checks import MAX_SEED, check_bool, check_choice, check_int, check_real
from ..curvature import KFACConfig
from ..evaluation.glm import GLM_MAX_TOKENS
from ..infer.laplace import PRIOR_PRECISION_METHODS
from ..infer.schedules import KLSchedule
from ..infer.svi import OptimConfig
from ..models import LoRAOptions
from ..priors import Prior
from .registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS, KLScheduleArgs, lookup, make_guide

__all__ = ["DataConfig", "EvalConfig", "GuideConfig", "LaplaceConfig", "ModelConfig", "ObjectiveConfig", "PRESETS",
           "PriorConfig", "RunConfig", "preset_config"]


@dataclass
class ModelConfig:
    """The base model and where it runs."""

    name: str | None = None  # None: the task's default (smollm2-135m, or minilm-l6 for encoders)
    device: str = "auto"
    dtype: str = "float32"
    attn_implementation: str | None = None  # None: transformers' default; "eager" or "sdpa"
    b_site: bool = False  # B a sample site too (default: a parameter)

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"model must be a model name, folder or hub id, got {self.name!r}")
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("attn_implementation", self.attn_implementation, (None, "eager", "sdpa"))
        check_bool("b_site", self.b_site)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


@dataclass
class DataConfig:
    """Which examples, and how long they may be."""

    train_limit: int | None = None
    test_limit: int | None = None
    max_length: int = 256
    split_seed: int = 0
    #: train / validation / test fractions of a task that ships one pool (None: 60 / 10 / 30)
    split_fractions: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.split_fractions is not None:
            try:
                self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
            except (TypeError, ValueError):
                raise ValueError(f"split_fractions must be three numbers, got {self.split_fractions!r}") from None
            if len(self.split_fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in self.split_fractions) \
                    or abs(sum(self.split_fractions) - 1) > 1e-6:
                raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, "
                                 f"got {self.split_fractions!r}")
        check_int("train_limit", self.train_limit, low=1, optional=True)
        check_int("test_limit", self.test_limit, low=1, optional=True)
        check_int("max_length", self.max_length, low=8)
        check_int("split_seed", self.split_seed, low=0, high=MAX_SEED)


@dataclass
class PriorConfig:
    """A registered prior by name (:data:`.registry.PRIORS`) and its scale."""

    name: str = "gaussian"
    scale: float = 0.2

    def __post_init__(self) -> None:
        lookup(PRIORS, self.name, "prior")
        check_real("prior_scale", self.scale, low=0, low_open=True)

    def build(self) -> Prior:
        return PRIORS[self.name](self.scale)


@dataclass
class GuideConfig:
    """A registered guide by name (:data:`.registry.GUIDES`), its options, and Flipout."""

    name: str = "map"
    flipout: bool | None = None  # None: on where the guide's marginals are Normal (registry.GuideEntry.flipout)
    blob_eps: float = 0.05
    sigma_param: str = "square"
    normal_init_scale: float = 0.01

    def __post_init__(self) -> None:
        entry = lookup(GUIDES, self.name, "guide")
        if self.flipout is None:
            self.flipout = entry.flipout
        check_real("blob_eps", self.blob_eps, low=0, low_open=True)
        check_choice("sigma_param", self.sigma_param, ("square", "softplus"))
        check_real("normal_init_scale", self.normal_init_scale, low=0, low_open=True)

    @property
    def options(self) -> dict[str, Any]:
        """The options a registered guide's ``build`` reads."""
        return {"blob_eps": self.blob_eps, "sigma_param": self.sigma_param, "normal_init_scale": self.normal_init_scale}

    def build(self, model: Any) -> Any:
        return make_guide(self.name, model, **self.options)


@dataclass
class ObjectiveConfig:
    """The ELBO and the weight of its KL term over training."""

    elbo: str = "meanfield"
    kl_schedule: str = "constant"
    kl_weight: float = 1.0
    kl_anneal_steps: int = 0
    #: ``blob`` schedule: the reference's dataset-rescaling exponent, ``M = int(100 N^(pi/gamma) / B)``
    blob_gamma: float = 8.0
    #: ``blob-cycles`` schedule: KL cycles completed within the run's steps
    kl_cycles: int = 4

    def __post_init__(self) -> None:
        lookup(ELBOS, self.elbo, "ELBO")
        lookup(KL_SCHEDULES, self.kl_schedule, "KL schedule")
        check_real("kl_weight", self.kl_weight, low=0)
        check_int("kl_anneal_steps", self.kl_anneal_steps, low=0)
        check_real("blob_gamma", self.blob_gamma, low=0, low_open=True)
        check_int("kl_cycles", self.kl_cycles, low=1)

    def kl(self, dataset_size: int, batch_size: int, steps: int = 1) -> KLSchedule:
        return KL_SCHEDULES[self.kl_schedule](KLScheduleArgs(self.kl_weight, self.kl_anneal_steps, dataset_size,
                                                             batch_size, self.blob_gamma, steps, self.kl_cycles))


@dataclass
class EvalConfig:
    """The N-sample predictive and the metrics."""

    samples: int = 10  # weight samples N (0: the mean weights)
    batch_size: int = 8
    max_rows: int = 64  # bound on rows per forward pass when samples are batched
    ece_bins: int = 15
    #: Flipout stays on in the N passes (the BLoB reference's evaluation): every token of every pass
    #: sees its own sign-flipped perturbation; one sample per forward pass
    flipout: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.flipout, bool):
            raise ValueError(f"eval flipout must be true or false, got {self.flipout!r}")
        check_int("eval_samples", self.samples, low=0)
        check_int("eval_batch_size", self.batch_size, low=1)
        check_int("max_rows", self.max_rows, low=1)
        check_int("ece_bins", self.ece_bins, low=1)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "lora": LoRAOptions, "prior": PriorConfig,
                              "guide": GuideConfig, "objective": ObjectiveConfig, "optim": OptimConfig,
                              "eval": EvalConfig}

#: Where each key of the flat ``config.json`` of earlier runs lives now.
_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "device": ("model", "device"), "dtype": ("model", "dtype"),
    "attn_implementation": ("model", "attn_implementation"), "b_site": ("model", "b_site"),
    "train_limit": ("data", "train_limit"), "test_limit": ("data", "test_limit"),
    "max_length": ("data", "max_length"), "split_seed": ("data", "split_seed"),
    "rank": ("lora", "rank"), "alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "targets": ("lora", "target_modules"), "prior": ("prior", "name"), "prior_scale": ("prior", "scale"),
    "guide": ("guide", "name"), "flipout": ("guide", "flipout"), "blob_eps": ("guide", "blob_eps"),
    "sigma_param": ("guide", "sigma_param"), "normal_init_scale": ("guide", "normal_init_scale"),
    "elbo": ("objective", "elbo"), "kl_schedule": ("objective", "kl_schedule"),
    "kl_weight": ("objective", "kl_weight"), "kl_anneal_steps": ("objective", "kl_anneal_steps"),
    "eval_samples": ("eval", "samples"), "eval_batch_size": ("eval", "batch_size"),
    "max_rows": ("eval", "max_rows"), "ece_bins": ("eval", "ece_bins")}


@dataclass
class RunConfig:
    """Everything needed to rebuild a run's model and guide and to repeat its training, one section
    per concern; each section checks its own values, so a bad value is refused before anything runs."""

    task: str = "arc-easy"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    prior: PriorConfig = field(default_factory=PriorConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a task name or a .jsonl/.csv file, got {self.task!r}")
        if not self.task.endswith((".jsonl", ".csv")):
            from ..data import get_task

            get_task(self.task)  # an unknown name is refused here, not at train()
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section(cls, name, value))
            elif not isinstance(value, cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """From :meth:`to_dict`'s nested layout, or the flat layout of earlier runs."""
        if not isinstance(data, dict):
            raise ValueError(f"a run configuration must be a mapping of sections, got {type(data).__name__}")
        if isinstance(data.get("guide"), str):  # the flat layout of earlier runs
            nested: dict[str, Any] = {}
            for key, value in data.items():
                section, name = _FLAT_KEYS.get(key, (key, ""))
                if name:
                    nested.setdefault(section, {})[name] = value
                else:
                    nested[key] = value
            data = nested
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**data)


def preset_config(preset: str, **sections: dict[str, Any] | str) -> RunConfig:
    """A :class:`RunConfig` from the named recipe (:data:`PRESETS`), with ``sections`` (``task=``, or
    nested values such as ``optim={"steps": 2000}``) given explicitly taking precedence, key by key,
    as explicit options do on the command line."""
    recipe = lookup(PRESETS, preset, "preset")
    merged: dict[str, Any] = {name: dict(values) for name, values in recipe.items()}
    for name, values in sections.items():
        if isinstance(values, dict):
            merged.setdefault(name, {}).update(values)
        else:
            merged[name] = values
    return RunConfig.from_dict(merged)


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"config section {name!r} has unknown keys {sorted(unknown)}")
    return cls(**values)


#: Named recipes, as partial nested configurations. ``blob`` is the BLoB reference's Llama recipe
#: (``scripts/blob/blob-llama-all-single-gpu.sh`` of Wang-ML-Lab/bayesian-peft): 5000 steps of
#: batch 4; AdamW (lr 1e-4, eps 1e-6, no weight decay) on ``M`` and ``B`` stepped on the likelihood's
#: gradient, then the KL's gradient (weight ``pi_i``, cycle ``M = int(100 N^(pi/8) / B)``) applied to
#: ``M`` and ``G`` by SGD at 0.01 (``split_kl``), both with 6 % warm-up then linear decay; prior
#: N(0, 0.2^2), ``G`` from U(0.05/sqrt 2, 0.05), ``sigma = G^2``; LoRA r 8, alpha 16 on q/v and the
#: class head; Flipout in training and in the N = 10 evaluation passes. The README names what differs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "blob": {"guide": {"name": "blob", "flipout": True, "blob_eps": 0.05, "sigma_param": "square"},
             "prior": {"name": "gaussian", "scale": 0.2},
             "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "class_head": True},
             "objective": {"elbo": "meanfield", "kl_schedule": "blob", "blob_gamma": 8.0},
             "optim": {"steps": 5000, "batch_size": 4, "lr": 1e-4, "g_lr": 1e-2, "g_optimizer": "sgd",
                       "split_kl": True, "warmup_ratio": 0.06, "decay": "linear", "adam_eps": 1e-6,
                       "weight_decay": 0.0},
             "eval": {"samples": 10, "flipout": True}},
    # BLoB's guide calibrated within a MAP's budget: its scales by AdamW (lr 1e-2) under the exact
    # ELBO tempered to w = 0.1, the weight validation NLL chose among 1, 0.1 and 0.01 on every seed
    # of the SST-2 studies (docs/RESULTS.md); means, B and steps as the run's own options say
    "blob-adam": {"guide": {"name": "blob", "flipout": True}, "objective": {"kl_schedule": "constant",
                                                                           "kl_weight": 0.1},
                  "optim": {"g_optimizer": "adamw", "g_lr": 1e-2, "split_kl": False}},
}


@dataclass
class LaplaceConfig:
    """A Laplace run: the adapter, the K-FAC pass, the prior precision and the predictive."""

    adapter: str = ""
    kfac: KFACConfig = field(default_factory=KFACConfig)
    a_only: bool = False
    prior_precision: str = "marglik"  # marglik | marglik-layerwise | val-nll | prior | <float>
    predictive: str = "glm"
    mc_samples: int = 1000
    #: bound on the padded tokens of one batch of a GLM pass (the predictive, the val-nll search)
    glm_max_tokens: int = GLM_MAX_TOKENS
    #: a Laplace run of the same adapter and training data whose K-FAC posterior is reused: only the
    #: prior precision is chosen again (one curvature pass for, e.g., both marglik and val-nll)
    curvature_from: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.kfac, dict):
            self.kfac = KFACConfig(**self.kfac)
        lookup(PREDICTIVES, self.predictive, "predictive")
        if self.prior_precision not in (*PRIOR_PRECISION_METHODS, "marglik-layerwise", "prior"):
            try:
                value = float(self.prior_precision)
            except ValueError:
                value = float("nan")
            if not 0 < value < float("inf"):
                raise ValueError(f"--prior-precision must be marglik, marglik-layerwise, val-nll, prior or a positive "
                                 f"finite number, got {self.prior_precision!r}")
        check_int("mc_samples", self.mc_samples, low=1)
        check_bool("a_only", self.a_only)
        if not isinstance(self.adapter, str) or not isinstance(self.curvature_from, str):
            raise ValueError("adapter and curvature_from must be folder paths (strings)")
        check_int("glm_max_tokens", self.glm_max_tokens, low=1)

    @property
    def batch_size(self) -> int:
        return self.kfac.batch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaplaceConfig":
        data = dict(data)
        flat = {k: data.pop(k) for k in ("fisher", "kfac_mode", "n_kfac", "dense_threshold", "batch_size") if k in data}
        if flat:  # the flat layout of earlier runs
            flat["mode"] = flat.pop("kfac_mode", "reduce")
            data["kfac"] = KFACConfig(**flat)
        return cls(**data)
