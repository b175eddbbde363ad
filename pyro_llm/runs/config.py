"""The resolved configuration of a run, one class per run kind, saved as ``config.json`` beside
its results: every kind shares the task and the model, data and evaluation sections
(:class:`BaseRunConfig`); an SVI run (:class:`SVIConfig`) adds the LoRA (the library's own
:class:`~pyro_llm.models.LoRAOptions`), prior, guide, objective and optimiser
(:class:`~pyro_llm.infer.OptimConfig`) sections, a Laplace run (:class:`LaplaceRunConfig`) the
adapter's LoRA and prior and its :class:`LaplaceConfig` (with the K-FAC pass's
:class:`~pyro_llm.curvature.KFACConfig` nested), a zero-shot run (:class:`ZeroShotConfig`)
nothing. Each field carries its default and help (:func:`pyro_llm.options.option`): the command
line generates its options from them, and the Python API gets the same checks. Names (guide,
prior, ELBO, KL schedule, predictive) are checked against :mod:`.registry`."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ..checks import MAX_SEED, check_bool, check_choice, check_int, check_real
from ..guides.blob import BLOB_EPS
from ..guides.ivon import IVON_BETA2, IVON_HESS_INIT
from ..options import option
from ..curvature import KFACConfig
from ..evaluation.glm import GLM_MAX_TOKENS
from ..infer.laplace import PRIOR_PRECISION_METHODS
from ..infer.schedules import KLSchedule
from ..infer.svi import OptimConfig
from ..models import LoRAOptions
from ..models.quantize import QUANTIZE_KINDS
from ..priors import DEFAULT_PRIOR_STD, Prior
from .compat import upgrade_laplace_dict, upgrade_run_dict
from .registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS, KLScheduleArgs, lookup, make_guide, names

__all__ = ["BaseRunConfig", "CONFIG_KINDS", "DataConfig", "EvalConfig", "GuideConfig", "LaplaceConfig",
           "LaplaceRunConfig", "ModelConfig", "ObjectiveConfig", "PRESETS", "PriorConfig", "SVIConfig", "ZeroShotConfig",
           "preset_config"]


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"split fractions must be three comma-separated numbers, got {text!r}") from None


@dataclass
class ModelConfig:
    """The base model and where it runs."""

    name: str | None = option(None, "Embedded name (smollm2-135m, minilm-l6), local folder or hub id "
                                    "(default: the task's).", flag="--model")
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto.")
    dtype: str = option("float32", "Base-model dtype (LoRA and guide parameters stay float32).",
                        choices=("float32", "bfloat16"))
    attn_implementation: str | None = option(None, "Attention kernel (default: transformers' choice; eager allows "
                                                   "double backward, e.g. Pyro's AutoLaplaceApproximation).",
                                             choices=("eager", "sdpa"))
    quantize: str | None = option(None, "Quantize the base model's linear layers with bitsandbytes (int8: LLM.int8; "
                                        "nf4: 4-bit NormalFloat); LoRA and guides stay float32.",
                                  choices=QUANTIZE_KINDS)
    gradient_checkpointing: bool = option(False, "Recompute each layer's activations in the backward pass "
                                                 "(transformers' activation checkpointing): less memory, a second "
                                                 "forward; Flipout's signs are replayed, gradients unchanged.")

    def __post_init__(self) -> None:
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_choice("quantize", self.quantize, (None, *QUANTIZE_KINDS))
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"model must be a model name, folder or hub id, got {self.name!r}")
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("attn_implementation", self.attn_implementation, (None, "eager", "sdpa"))
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


@dataclass
class DataConfig:
    """Which examples, and how long they may be."""

    train_limit: int | None = option(None, "Use a seeded subset of the training split.")
    test_limit: int | None = option(None, "Use a seeded subset of the test split.")
    max_length: int = option(256, "Tokens per example (prompts are left-truncated).")
    split_seed: int = option(0, "Seed of the train/validation/test split of a task that ships one pool.")
    split_fractions: tuple[float, float, float] | None = option(
        None, "Train,validation,test fractions of a task that ships one pool (default 0.6,0.1,0.3).",
        parse=_fractions)

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
    """A registered prior by name (:data:`.registry.PRIORS`, plugins included) and its scale."""

    name: str = option("gaussian", "Prior of every LoRA entry (a name, or package.module:Factory taking the "
                                   "scale).", flag="--prior", choices=lambda: names(PRIORS))
    scale: float = option(DEFAULT_PRIOR_STD, "Prior std (Gaussian) or scale.", flag="--prior-scale")

    def __post_init__(self) -> None:
        lookup(PRIORS, self.name, "prior")
        check_real("prior_scale", self.scale, low=0, low_open=True)

    def build(self) -> Prior:
        return lookup(PRIORS, self.name, "prior")(self.scale)


@dataclass
class GuideConfig:
    """A registered guide by name (:data:`.registry.GUIDES`, plugins included), its options, and Flipout."""

    name: str = option("map", "The variational family (a name, or package.module:GuideClass).", flag="--guide",
                       choices=lambda: names(GUIDES))
    flipout: bool | None = option(None, "Flipout on the LoRA products (default: on for guides with Normal "
                                        "marginals, normal and blob).", flag="--flipout/--no-flipout")
    blob_eps: float = option(BLOB_EPS, "BLoB: initial G uniform on [eps / sqrt 2, eps].")
    sigma_param: str = option("square", "BLoB: sigma = G^2 (the reference) or softplus(G).",
                              choices=("square", "softplus"))
    normal_init_scale: float = option(0.01, "Initial scale of Pyro's AutoNormal and low-rank guides.")
    ivon_ess: float | None = option(None, "IVON: effective sample size (default: the training set's size, the "
                                          "untempered posterior; larger tempers it).")
    ivon_hess_init: float = option(IVON_HESS_INIT, "IVON: initial Hessian estimate h (sigma starts at "
                                                   "1 / sqrt(ess (h + prior precision / ess))).")
    ivon_beta2: float = option(IVON_BETA2, "IVON: the Hessian estimate's momentum (1 - beta2 weighs each step's "
                                           "estimate).")
    ivon_clip_radius: float | None = option(None, "IVON: bound on each entry's preconditioned step (default: none; "
                                                  "IVON's LoRA recipe: 1e-3).")
    ivon_rescale_lr: bool = option(True, "IVON: scale --lr by hess_init + prior precision / ess (IVON's default; "
                                         "its LoRA recipe turns it off).", flag="--ivon-rescale-lr/--no-ivon-rescale-lr")

    def __post_init__(self) -> None:
        entry = lookup(GUIDES, self.name, "guide")
        if self.flipout is None:
            self.flipout = entry.flipout
        check_bool("flipout", self.flipout, optional=True)
        check_real("blob_eps", self.blob_eps, low=0, low_open=True)
        check_choice("sigma_param", self.sigma_param, ("square", "softplus"))
        check_real("normal_init_scale", self.normal_init_scale, low=0, low_open=True)
        check_real("ivon_ess", self.ivon_ess, low=0, low_open=True, optional=True)
        check_real("ivon_hess_init", self.ivon_hess_init, low=0, low_open=True)
        check_real("ivon_beta2", self.ivon_beta2, low=0, high=1)
        check_real("ivon_clip_radius", self.ivon_clip_radius, low=0, low_open=True, optional=True)
        check_bool("ivon_rescale_lr", self.ivon_rescale_lr)

    @property
    def options(self) -> dict[str, Any]:
        """The options a registered guide's ``build`` reads."""
        return {"blob_eps": self.blob_eps, "sigma_param": self.sigma_param, "normal_init_scale": self.normal_init_scale,
                "ivon_ess": self.ivon_ess, "ivon_hess_init": self.ivon_hess_init, "ivon_beta2": self.ivon_beta2,
                "ivon_clip_radius": self.ivon_clip_radius, "ivon_rescale_lr": self.ivon_rescale_lr}

    def build(self, model: Any) -> Any:
        return make_guide(self.name, model, **self.options)


@dataclass
class ObjectiveConfig:
    """The ELBO and the weight of its KL term over training."""

    elbo: str = option("meanfield", "meanfield: closed-form KL where one exists; trace: sampled KL.",
                       choices=lambda: list(ELBOS))
    kl_schedule: str = option("constant", "The KL weight over training (a name, or package.module:factory).",
                              choices=lambda: names(KL_SCHEDULES))
    kl_weight: float = option(1.0, "KL weight (constant) or final weight (linear).")
    kl_anneal_steps: int = option(0, "KL schedule linear: steps from 0 to --kl-weight.")
    blob_gamma: float = option(8.0, "KL schedule blob: cycle length M = int(100 N^(pi/gamma) / batch) (the "
                                    "reference's rescaling).")
    kl_cycles: int = option(4, "KL schedule blob-cycles: cycles completed within --steps.")

    def __post_init__(self) -> None:
        lookup(ELBOS, self.elbo, "ELBO")
        lookup(KL_SCHEDULES, self.kl_schedule, "KL schedule")
        check_real("kl_weight", self.kl_weight, low=0)
        check_int("kl_anneal_steps", self.kl_anneal_steps, low=0)
        check_real("blob_gamma", self.blob_gamma, low=0, low_open=True)
        check_int("kl_cycles", self.kl_cycles, low=1)

    def kl(self, dataset_size: int, batch_size: int, steps: int = 1) -> KLSchedule:
        factory = lookup(KL_SCHEDULES, self.kl_schedule, "KL schedule")
        return factory(KLScheduleArgs(self.kl_weight, self.kl_anneal_steps, dataset_size, batch_size,
                                      self.blob_gamma, steps, self.kl_cycles))


@dataclass
class EvalConfig:
    """The N-sample predictive and the metrics."""

    samples: int = option(10, "Weight samples N at evaluation (0: the mean weights).", flag="--eval-samples")
    batch_size: int = option(8, "Examples per evaluation pass (and per GLM pass of a Laplace run).",
                             flag="--eval-batch-size")
    max_rows: int = option(64, "Bound on rows per forward pass when samples are batched.")
    ece_bins: int = option(15, "Equal-width bins of the ECE.")
    flipout: bool = option(False, "Flipout on in the N evaluation passes (the BLoB reference's evaluation): one "
                                  "sample per pass, every token its own perturbation.",
                           flag="--eval-flipout/--no-eval-flipout")

    def __post_init__(self) -> None:
        check_bool("eval flipout", self.flipout)
        check_int("eval_samples", self.samples, low=0)
        check_int("eval_batch_size", self.batch_size, low=1)
        check_int("max_rows", self.max_rows, low=1)
        check_int("ece_bins", self.ece_bins, low=1)


class BaseRunConfig:
    """What every kind of run shares: the task, the base model, the data and the evaluation. Each
    kind (:class:`SVIConfig`, :class:`LaplaceRunConfig`, :class:`ZeroShotConfig`) adds its own
    sections and records exactly its fields in ``config.json`` (``KIND`` names it there); each
    section checks its own values, so a bad value is refused before anything runs.

    Subclasses are dataclasses whose section fields are typed by their section classes
    (:attr:`SECTIONS`): a section given as a mapping (``from_dict``, the command line) is built and
    checked here."""

    KIND: ClassVar[str] = ""
    #: section name -> its class, for every section field of this kind
    SECTIONS: ClassVar[dict[str, type]] = {}

    task: str
    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    seed: int  # the seed of the run's random draws (a field or a property of each kind)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a task name or a .jsonl/.csv file, got {self.task!r}")
        if not self.task.endswith((".jsonl", ".csv")):
            from ..data import get_task

            get_task(self.task)  # an unknown name is refused here, not at train()
        for name, cls in self.SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section(cls, name, value))
            elif not isinstance(value, cls):
                raise TypeError(f"{type(self).__name__}.{name} must be a {cls.__name__}, got {type(value).__name__}")

    def model_parts(self) -> tuple[LoRAOptions, Prior | None, bool]:
        """``(LoRA options, prior, whether B is a sample site)`` of the model this run builds."""
        return LoRAOptions(), None, False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def like(cls, other: "BaseRunConfig", **values: Any) -> Any:
        """This kind's configuration with ``other``'s shared sections (task, model, data, evaluation)
        and ``values`` (this kind's own, as in :meth:`from_dict`), e.g. a Laplace run around an SVI
        run's adapter: ``LaplaceRunConfig.like(svi, seed=svi.seed, laplace={"adapter": "runs/map"})``."""
        theirs = other.to_dict()
        return cls.from_dict({**{name: theirs[name] for name in ("task", *_SHARED)}, **values})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """From :meth:`to_dict`'s layout (earlier releases' layouts are upgraded by :mod:`.compat`)."""
        if not isinstance(data, dict):
            raise ValueError(f"a run configuration must be a mapping of sections, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        data = upgrade_run_dict(data, cls.KIND, known)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**data)


_SHARED = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}
_TASK = option("arc-easy", "Task name (see `pyro-llm tasks`) or a .jsonl/.csv file.")


@dataclass
class SVIConfig(BaseRunConfig):
    """An SVI run (``pyro-llm svi-train``): everything needed to rebuild its model and guide and to
    repeat its training."""

    KIND: ClassVar[str] = "svi"
    SECTIONS: ClassVar[dict[str, type]] = {**_SHARED, "lora": LoRAOptions, "prior": PriorConfig, "guide": GuideConfig,
                                           "objective": ObjectiveConfig, "optim": OptimConfig}

    task: str = _TASK
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    b_site: bool = option(False, "Make B a sample site too (default: a parameter).", flag="--b-site/--b-param")
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    prior: PriorConfig = field(default_factory=PriorConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("b_site", self.b_site)

    @property
    def seed(self) -> int:
        return self.optim.seed

    def model_parts(self) -> tuple[LoRAOptions, Prior | None, bool]:
        return self.lora, self.prior.build(), self.b_site


@dataclass
class ZeroShotConfig(BaseRunConfig):
    """A zero-shot run (``pyro-llm zero-shot``): the base model evaluated, no adapter, no draws."""

    KIND: ClassVar[str] = "zero-shot"
    SECTIONS: ClassVar[dict[str, type]] = _SHARED

    task: str = _TASK
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def seed(self) -> int:
        return 0


def preset_config(preset: str, **sections: dict[str, Any] | str) -> SVIConfig:
    """An :class:`SVIConfig` from the named recipe (:data:`PRESETS`), with ``sections`` (``task=``, or
    nested values such as ``optim={"steps": 2000}``) given explicitly taking precedence, key by key,
    as explicit options do on the command line."""
    recipe = lookup(PRESETS, preset, "preset")
    merged: dict[str, Any] = {name: dict(values) for name, values in recipe.items()}
    for name, values in sections.items():
        if isinstance(values, dict):
            merged.setdefault(name, {}).update(values)
        else:
            merged[name] = values
    return SVIConfig.from_dict(merged)


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"config section {name!r} has unknown keys {sorted(unknown)}")
    return cls(**values)


#: Named recipes, as differences from the defaults (a test checks that every value differs).
#: ``blob`` is the BLoB reference's Llama recipe (``scripts/blob/blob-llama-all-single-gpu.sh`` of
#: Wang-ML-Lab/bayesian-peft): 5000 steps of batch 4; AdamW (lr 1e-4, eps 1e-6, no weight decay) on
#: ``M`` and ``B`` stepped on the likelihood's gradient, then the KL's gradient (weight ``pi_i``,
#: cycle ``M = int(100 N^(pi/8) / B)``) applied to ``M`` and ``G`` by SGD at 0.01 (``split_kl``),
#: both with 6 % warm-up then linear decay; prior N(0, 0.2^2), ``G`` from U(0.05/sqrt 2, 0.05),
#: ``sigma = G^2``; LoRA r 8, alpha 16 on q/v and the class head; Flipout in training and in the
#: N = 10 evaluation passes. The defaults already hold the values not listed; the docs name what differs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "blob": {"guide": {"name": "blob"},
             "lora": {"class_head": True},
             "objective": {"kl_schedule": "blob"},
             "optim": {"steps": 5000, "split_kl": True},
             "eval": {"flipout": True}},
    # BLoB's guide calibrated within a MAP's budget: its scales by AdamW (lr 1e-2, the default g_lr)
    # under the exact ELBO tempered to w = 0.1, the weight validation NLL chose on every seed of the
    # SST-2 studies (docs); means, B and steps as the run's own options say
    "blob-adam": {"guide": {"name": "blob"}, "objective": {"kl_weight": 0.1}, "optim": {"g_optimizer": "adamw"}},
}


@dataclass
class LaplaceConfig:
    """The Laplace section of a Laplace run: the adapter, the K-FAC pass, the posterior's extent, the
    prior precision and the predictive."""

    adapter: str = option("", "A pyro-llm MAP run folder or any peft LoRA adapter folder.", cli=False)
    kfac: KFACConfig = option(default_factory=KFACConfig, help="The K-FAC pass.", cli=False)
    a_only: bool = option(False, "Posterior over A only (default: A and B, as the paper).")
    prior_precision: str = option("marglik", "marglik, marglik-layerwise, val-nll, prior (1/sigma^2 of the adapter "
                                             "run's Gaussian prior), or a fixed positive number.")
    predictive: str = option("glm", "glm: linearised, probit; glm-mc: linearised, Monte Carlo over logits; nn: weight "
                                    "samples through the network; map: the MAP alone.",
                             choices=lambda: list(PREDICTIVES))
    mc_samples: int = option(1000, "Logit samples of the glm-mc predictive.")
    glm_max_tokens: int = option(GLM_MAX_TOKENS, "Bound on the padded tokens of one batch of a GLM pass (every "
                                                 "choice of a cloze question counted); its memory grows with them.")
    curvature_from: str = option("", "A Laplace run of the same adapter and data whose K-FAC is reused; only the "
                                     "prior precision is chosen again.")

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaplaceConfig":
        return cls(**upgrade_laplace_dict(data))


@dataclass
class LaplaceRunConfig(BaseRunConfig):
    """A Laplace run (``pyro-llm laplace``): the model as built around the adapter (its LoRA, the
    prior of the run that trained it, ``B`` a site unless ``laplace.a_only``) and the Laplace
    section. The GLM passes read ``eval.batch_size`` examples at a time, the K-FAC pass its own
    ``laplace.kfac.batch_size``."""

    KIND: ClassVar[str] = "laplace"
    SECTIONS: ClassVar[dict[str, type]] = {**_SHARED, "lora": LoRAOptions, "prior": PriorConfig,
                                           "laplace": LaplaceConfig}

    task: str = _TASK
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAOptions = option(default_factory=LoRAOptions, help="The adapter's LoRA (read from it).", cli=False)
    prior: PriorConfig = option(default_factory=PriorConfig, help="The prior of the run that trained the adapter "
                                                                  "(a foreign peft adapter: this one).", cli=False)
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    seed: int = option(0, "Seed of the sampled Fisher's labels and of the sampled predictive.", flag="--seed")

    def __post_init__(self) -> None:
        if isinstance(self.laplace, dict):
            self.laplace = LaplaceConfig.from_dict(self.laplace)
        super().__post_init__()
        check_int("seed", self.seed, low=0, high=MAX_SEED)

    def model_parts(self) -> tuple[LoRAOptions, Prior | None, bool]:
        return self.lora, self.prior.build(), not self.laplace.a_only


#: each run kind's configuration class, by the kind ``config.json`` names
CONFIG_KINDS: dict[str, type[BaseRunConfig]] = {c.KIND: c for c in (SVIConfig, LaplaceRunConfig, ZeroShotConfig)}
