"""The resolved configuration of a run, saved as ``config.json`` beside its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .infer.svi import OptimConfig

__all__ = ["RunConfig", "PRESETS"]

GUIDE_CHOICES = ("map", "normal", "blob")


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
    flipout: bool = True
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
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.guide not in GUIDE_CHOICES:
            raise ValueError(f"unknown guide {self.guide!r}; choose one of {', '.join(GUIDE_CHOICES)}")
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if self.targets is not None:
            self.targets = tuple(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
