"""The resolved configuration of a run, saved as ``config.json`` beside its weights: an SVI run's
:class:`RunConfig` (with the optimiser's :class:`~pyro_llm.infer.OptimConfig` nested) and a Laplace
run's :class:`LaplaceConfig` (with the K-FAC pass's :class:`~pyro_llm.curvature.KFACConfig` nested).
Names (guide, prior, ELBO, KL schedule, predictive) are checked against :mod:`.registry`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..curvature import KFACConfig
from ..infer.laplace import PRIOR_PRECISION_METHODS
from ..infer.svi import OptimConfig
from .registry import ELBOS, GUIDES, KL_SCHEDULES, PREDICTIVES, PRIORS, lookup

__all__ = ["LaplaceConfig", "PRESETS", "RunConfig"]


@dataclass
class RunConfig:
    """Everything needed to rebuild a run's model and guide and to repeat its training."""

    task: str = "arc-easy"
    model: str | None = None  # None: the task's default (smollm2-135m, or minilm-l6 for encoders)
    guide: str = "map"
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    prior: str = "gaussian"
    prior_scale: float = 0.2
    b_site: bool = False
    elbo: str = "meanfield"
    flipout: bool | None = None  # None: on where the guide's marginals are Normal (registry.GuideEntry.flipout)
    kl_schedule: str = "constant"
    kl_weight: float = 1.0
    kl_anneal_steps: int = 0
    blob_eps: float = 0.05
    sigma_param: str = "square"
    normal_init_scale: float = 0.01
    eval_samples: int = 10
    eval_batch_size: int = 8
    max_rows: int = 64
    train_limit: int | None = None
    test_limit: int | None = None
    max_length: int = 256
    split_seed: int = 0
    ece_bins: int = 15
    device: str = "auto"
    dtype: str = "float32"
    attn_implementation: str | None = None  # None: transformers' default; "eager" or "sdpa"
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        entry = lookup(GUIDES, self.guide, "guide")
        lookup(PRIORS, self.prior, "prior")
        lookup(ELBOS, self.elbo, "ELBO")
        lookup(KL_SCHEDULES, self.kl_schedule, "KL schedule")
        if self.attn_implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"attn_implementation must be eager or sdpa, got {self.attn_implementation!r}")
        if self.flipout is None:
            self.flipout = entry.flipout
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if self.targets is not None:
            self.targets = tuple(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def guide_options(self) -> dict[str, Any]:
        """The options a registered guide's ``build`` reads."""
        return {"blob_eps": self.blob_eps, "sigma_param": self.sigma_param, "normal_init_scale": self.normal_init_scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}")
        return cls(**data)


#: Named recipes. ``blob`` follows the BLoB reference as closely as Pyro allows: AdamW (lr 1e-4,
#: eps 1e-6, no weight decay) on ``M`` and ``B``, plain SGD with lr 1e-2 on ``G``, 6 % linear
#: warm-up then linear decay, prior N(0, 0.2^2), Flipout, and the reference's tempered KL weight
#: (``2^i`` reweighting, see :class:`~pyro_llm.infer.BlobKLReweighting`). Differences: the loss is
#: the per-example negative ELBO (the reference's mean NLL + pi_i KL up to the factor N).
PRESETS: dict[str, dict[str, Any]] = {
    "blob": {"guide": "blob", "prior": "gaussian", "prior_scale": 0.2, "kl_schedule": "blob", "flipout": True,
             "optim": {"lr": 1e-4, "g_lr": 1e-2, "g_optimizer": "sgd", "warmup_ratio": 0.06, "decay": "linear",
                       "adam_eps": 1e-6, "weight_decay": 0.0}},
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
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {self.mc_samples}")

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
