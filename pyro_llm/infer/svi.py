"""Stochastic variational inference over the LoRA sites, with torch optimisers.

One step is exactly ``pyro.infer.SVI.step`` — the ELBO's differentiable loss of model and guide,
backpropagated into every ``pyro.param`` the two touch — but the parameters are then updated by
``torch.optim`` optimisers with LR schedules, so BLoB's recipe (AdamW on ``M`` and ``B``, a
separate optimiser and rate for ``G``), gradient clipping and mixed precision are available.
``pyro.infer.SVI`` itself also works against the same model and guide (see the tests).

The loss is the negative ELBO divided by the data-set size ``N`` (the per-example ELBO): the same
optimum, and learning rates keep the meaning they have in the reference code (mean NLL).

Several processes: under ``torch.distributed`` (launched by ``torchrun`` or ``accelerate launch``)
each rank takes its share of every global minibatch, each rank's loss is an unbiased estimate of
the same ELBO (the plate scales its share by ``N / local batch``), and gradients are averaged with
``all_reduce`` before the update, so ranks stay identical. Rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.distributions as pdist
import torch
from pyro import poutine
from pyro.infer import ELBO
from tqdm.auto import tqdm

from .. import ranks
from ..checks import MAX_SEED, check_choice, check_int, check_real
from ..options import option
from ..data.collate import EncodedDataset
from ..distributions import base_distribution
from ..guides.ops import guide_scales
from ..guides.roles import LOC, SCALE, OwnsOptimizer, param_roles
from ..models.model import BayesianLoRAModel
from ..poutine import FlipoutMessenger, kl_weight
from ..io import CorruptFileError
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .schedules import KLSchedule, ConstantKL, warmup_decay
from .elbo import MeanFieldELBO

__all__ = ["NonFiniteLossError", "OptimConfig", "SVITrainer"]


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient or a parameter became NaN or infinite; no checkpoint is written from
    that state, and the message names the step and the last good checkpoint."""


@dataclass
class OptimConfig:
    """Optimisation settings (the BLoB reference's values as defaults where it has them)."""

    steps: int = option(200, "Training steps.")
    batch_size: int = option(4, "Examples per step.")
    lr: float = option(1e-4, "AdamW learning rate of the means and B.")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (the prior already regularises).")
    adam_eps: float = option(1e-6, "AdamW epsilon.")
    warmup_ratio: float = option(0.06, "Fraction of the steps spent warming the learning rates up from 0 (0 to 1).")
    decay: str = option("linear", "Learning-rate decay after the warm-up.", choices=("linear", "constant"))
    #: The guide's scale parameters (BLoB's ``G``, ``AutoNormal``'s scales: whatever the guide
    #: declares a scale, :mod:`pyro_llm.guides.roles`) get their own optimiser and rate: where an
    #: adapter has many ``A`` entries per training example, a fast rate lets the KL pull ``sigma``
    #: to the prior's scale within a few hundred steps (docs: "Methods").
    g_lr: float = option(1e-2, "Learning rate of the guide's scales (BLoB's G).")
    g_optimizer: str = option("sgd", "Optimiser of the guide's scales.", choices=("sgd", "adamw"))
    #: The BLoB reference's two-optimiser update: the main optimiser (AdamW) steps on the
    #: likelihood's gradient alone; then the KL term's gradient, taken at the updated means, is
    #: applied to *every* parameter by plain SGD at ``g_lr`` (the scales keep their likelihood
    #: gradient and add the KL's). Off: one backward of NLL + KL, each parameter by its own optimiser.
    split_kl: bool = option(False, "The BLoB reference's update: AdamW on the likelihood's gradient, then SGD at "
                                   "--g-lr on the KL's gradient for every parameter.")
    grad_clip: float | None = option(None, "Clip the gradients' global norm to this value.")
    checkpoint_every: int = option(50, "Steps between checkpoints (a killed run resumes from the last).")
    seed: int = option(0, "Seed of every random draw (data order, initialisation, noise, evaluation draws).")
    metadata: dict[str, Any] = option(default_factory=dict, help="Free-form facts recorded with the run.", cli=False)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0, high=MAX_SEED)
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict, got {self.metadata!r}")
        for name in ("lr", "g_lr", "weight_decay"):  # 0 is allowed: e.g. a run that only evaluates
            check_real(name, getattr(self, name), low=0)
        check_real("adam_eps", self.adam_eps, low=0, low_open=True)
        check_real("warmup_ratio", self.warmup_ratio, low=0, high=1)
        check_real("grad_clip", self.grad_clip, low=0, low_open=True, optional=True)
        check_choice("decay", self.decay, ("linear", "constant"))
        check_choice("g_optimizer", self.g_optimizer, ("sgd", "adamw"))
        if not isinstance(self.split_kl, bool):
            raise ValueError(f"split_kl must be true or false, got {self.split_kl!r}")
        if self.split_kl and self.g_optimizer != "sgd":
            raise ValueError("split_kl applies the KL's gradient by SGD at g_lr (the BLoB reference); "
                             "it needs g_optimizer='sgd'")


def _optimizer(cls: type[torch.optim.Optimizer], params: list[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """``cls`` with its fused implementation where the parameters' device and dtype have one
    (CPU and CUDA, float32/bfloat16; what Hugging Face's Trainer uses by default), its per-tensor
    one otherwise. With one tensor per LoRA matrix (180 for BLoB on SmolLM2's q/v) the per-tensor
    loop costs several milliseconds a step on a CPU."""
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return cls(params, **kwargs)


def progress_fields(record: dict[str, float], sigma: float | None = None) -> dict[str, str]:
    """What the progress bar shows of a step, in terms a user can read: the data's NLL per example;
    the KL per example and its share of the loss (under a tempered or cycled KL the weighted one),
    or a MAP's ``-log p(A) / N``; the guide's mean ``sigma`` (``sigma``: the last one recorded)."""
    out = {"nll": f"{record['nll']:.4g}"} if "nll" in record else {"loss": f"{record['loss']:.4g}"}
    if "kl" in record and "nll" in record:
        total = abs(record["nll"]) + abs(record["kl"])
        out["kl"] = f"{record['kl']:.4g}"
        out["kl_share"] = f"{100 * abs(record['kl']) / total:.0f}%" if total > 0 else "0%"
    if "neg_log_prior" in record:
        out["-log_prior"] = f"{record['neg_log_prior']:.4g}"
    sigma = record.get("sigma_mean", sigma)
    if sigma is not None:
        out["sigma"] = f"{sigma:.3g}"
    return out


class SVITrainer:
    """Trains ``guide`` (and the model's deterministic params) on ``data`` by SVI.

    :param use_flipout: wrap each step in :func:`pyro_llm.poutine.flipout` over the model's LoRA
        sites. ``None`` (default): Flipout wherever a site's guide distribution is a Normal marginal,
        silently elsewhere (a point guide trains as it is); ``True``: the same, with a
        :class:`~pyro_llm.poutine.FlipoutNotApplied` warning naming the sites it cannot apply to;
        ``False``: off.
    :param kl_schedule: KL weight per step (default: the exact ELBO, ``w = 1``).
    :param run_dir: where checkpoints go (none without it).
    :param validate_every_step: keep Pyro's validation (distribution arguments, model/guide match)
        on for every step. By default it runs on the set-up pass over the first batch only, which
        catches what it can catch; afterwards it would only cost time (about a fifth of BLoB's
        per-step overhead over plain LoRA), and a NaN still stops training through the loss check.
    """

    def __init__(self, model: BayesianLoRAModel, guide: Callable[..., Any], config: OptimConfig, *,
                 elbo: ELBO | None = None, use_flipout: bool | None = None, kl_schedule: KLSchedule | None = None,
                 run_dir: Path | None = None, progress: bool = True, validate_every_step: bool = False) -> None:
        self.model = model
        self.guide = guide
        self.config = config
        self.elbo = elbo or MeanFieldELBO()
        self.validate_every_step = validate_every_step
        self.use_flipout = use_flipout is not False
        # one handler for all steps: it learns which sites read the same input and fuses their products
        self._flipout = FlipoutMessenger(sites=model.site_names, warn=use_flipout is True)
        self.kl_schedule = kl_schedule or ConstantKL(1.0)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.param_names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[torch.optim.lr_scheduler.LambdaLR] = []
        self.history: list[dict[str, float]] = []
        self.last_checkpoint = 0  # the step of the last checkpoint written or resumed from
        self.last_terms: dict[str, float] = {}  # the last step's per-example NLL and KL (MeanFieldELBO)
        self._point = False  # every latent site a point mass (set at the first step)
        # a guide trained by its own optimiser takes the prior through it: the loss is the NLL alone
        self._own_optimizer = isinstance(guide, OwnsOptimizer)
        if self._own_optimizer and config.split_kl:
            raise ValueError(f"{type(guide).__name__} updates its parameters with its own optimiser; split_kl "
                             "(the BLoB reference's second optimiser) does not apply to it")

    # -- the loss ----------------------------------------------------------------------------------
    def _examples(self, batch: dict[str, torch.Tensor]) -> int:
        """``N``, by which the ELBO is divided to make it per example."""
        return self.model.dataset_size or batch["labels"].shape[0]

    def _handlers(self, step: int) -> contextlib.ExitStack:
        """Flipout and the step's KL weight, as one context."""
        stack = contextlib.ExitStack()
        if self.use_flipout:
            # read from the model at every step: a layer recomputed under activation checkpointing
            # must redo every operation of its first pass, so no view may be shared across layers
            self._flipout.shared_blocks = not getattr(self.model, "checkpointed_layers", None)
            stack.enter_context(self._flipout)
        w = self.kl_weight(step)
        if w != 1.0:
            stack.enter_context(kl_weight(weight=w, sites=self.model.site_names))
        return stack

    def kl_weight(self, step: int) -> float:
        """The KL term's weight at ``step``: the schedule's, or 0 for a guide whose own optimiser takes
        the prior (:class:`~pyro_llm.guides.roles.OwnsOptimizer`)."""
        return 0.0 if self._own_optimizer else float(self.kl_schedule(step))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.model, self.guide, **batch) / self._examples(batch)

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Negative per-example ELBO of one minibatch (KL weighted by the schedule)."""
        with self._handlers(step):
            return self._loss(batch)

    def kl_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The weighted KL term of :meth:`loss` alone, at the parameters' current values: the same
        ELBO of the guide against the model's sites without the network (``model.sample_sites``)."""
        with kl_weight(weight=self.kl_weight(step), sites=self.model.site_names):
            return self.elbo.differentiable_loss(self.model.sample_sites, self.guide) / self._examples(batch)

    # -- set-up ------------------------------------------------------------------------------------
    def _setup(self, batch: dict[str, torch.Tensor]) -> None:
        with poutine.trace(param_only=True) as tr:
            self.loss(batch, 0)
        store = dict(pyro.get_param_store().named_parameters())
        self.param_names = sorted(tr.trace.nodes)
        self._point = self._is_point_guide(batch)
        roles = param_roles(self.guide, [store[n] for n in self.param_names])
        main, g_params = roles[LOC], roles[SCALE]
        cfg = self.config
        self.optimizers = []
        if self._own_optimizer:  # the guide's optimiser takes its parameters at the run's learning rate
            own = self.guide.make_optimizer(cfg.lr)  # type: ignore[union-attr]
            owned = {id(p) for group in own.param_groups for p in group["params"]}
            main, g_params = [p for p in main if id(p) not in owned], [p for p in g_params if id(p) not in owned]
            self.optimizers.append(own)
        if main or not self._own_optimizer:
            self.optimizers.append(_optimizer(torch.optim.AdamW, main, lr=cfg.lr, eps=cfg.adam_eps,
                                              weight_decay=cfg.weight_decay))
        if cfg.split_kl:  # the reference's second optimiser: SGD on every parameter, for the KL's gradient
            self.optimizers.append(torch.optim.SGD(main + g_params, lr=cfg.g_lr))
        elif g_params:
            if cfg.g_optimizer == "sgd":
                self.optimizers.append(_optimizer(torch.optim.SGD, g_params, lr=cfg.g_lr))
            else:
                self.optimizers.append(_optimizer(torch.optim.AdamW, g_params, lr=cfg.g_lr, eps=cfg.adam_eps,
                                                  weight_decay=0.0))
        factor = warmup_decay(cfg.steps, cfg.warmup_ratio, cfg.decay)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]

    def _is_point_guide(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether every latent site of the guide is a point mass (``AutoDelta``, a MAP): the ELBO's
        second term is then ``-log p(A) / N``, the prior's penalty, not a KL, and is named so. One
        guide pass on the set-up batch, its random draws taken from a forked generator."""
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
            trace = poutine.trace(self.guide).get_trace(**batch)
        latent = [node for node in trace.nodes.values() if node["type"] == "sample" and not node["is_observed"]]
        return bool(latent) and all(isinstance(base_distribution(node["fn"]), pdist.Delta) and
                                    not node["infer"].get("is_auxiliary") for node in latent)

    def optim_state(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_optim_state(self, state: dict[str, Any]) -> None:
        """The saved optimiser and schedule states, with this trainer's learning rates, weight decay
        and schedule in force from the saved step on (a resumed run may change them, e.g. a lower
        learning rate after a non-finite stop); moments and step counts are the saved ones."""
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(state.get('optimizers', []))} optimiser states; this "
                             f"guide and configuration use {len(self.optimizers)}")
        # this trainer's base rates and weight decays, as its optimisers were built, before the saved ones
        current = [[(g["initial_lr"], g.get("weight_decay")) for g in o.param_groups] for o in self.optimizers]
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        for opt, sch, settings in zip(self.optimizers, self.schedulers, current):
            sch.base_lrs = [base for base, _ in settings]
            for group, f, (base, decay) in zip(opt.param_groups, sch.lr_lambdas, settings):
                group["initial_lr"] = base
                group["lr"] = base * f(sch.last_epoch)
                if decay is not None:
                    group["weight_decay"] = decay

    # -- several processes -------------------------------------------------------------------------
    def _local(self, index: torch.Tensor) -> torch.Tensor:
        rank, world = ranks.world()
        if world > 1 and index.shape[0] % world:
            raise ValueError(f"batch size {index.shape[0]} is not divisible by the {world} processes")
        return index[rank::world]

    def _average_gradients(self, params: list[torch.Tensor]) -> None:
        _, world = ranks.world()
        if world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # one bucket: every gradient in one flat buffer, one all-reduce, copied back
        for p, g in zip(params, ranks.sum_across([p.grad for p in params])):
            p.grad.copy_(g).div_(world)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor], step: int, params: list[torch.Tensor] | None = None) -> float:
        """One update on ``batch`` (the loss, its gradients averaged over ranks, the optimisers and
        schedules); returns the loss. Raises :class:`NonFiniteLossError` on a NaN or infinite loss."""
        if not self.optimizers:
            self._setup(batch)
        if params is None:
            store = dict(pyro.get_param_store().named_parameters())
            params = [store[n] for n in self.param_names]
        try:
            # the backward runs inside the handlers: a layer recomputed under activation
            # checkpointing sends its LoRA products through Flipout again, which replays its signs
            with self._handlers(step), (contextlib.nullcontext() if self.validate_every_step
                                        else pyro.validation_enabled(False)):
                loss = self._loss(batch)
                self._backward(loss, batch)
        except FloatingPointError as err:
            raise NonFiniteLossError(f"{err} at step {step}; {self._advice()}") from err
        self._average_gradients(params)
        # one host sync for the loss the progress bar shows and the gradients' finiteness together
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
        n = self._examples(batch)
        terms = getattr(self.elbo, "last_terms", None) or {}
        parts = [torch.as_tensor(terms[k], dtype=torch.float32, device=loss.device).detach().reshape(()) / n
                 for k in ("nll", "kl") if k in terms]
        value, grad_norm, *rest = torch.stack([loss.detach().float(), norm.float().to(loss.device), *parts]).tolist()
        self.last_terms = dict(zip(("nll", "kl"), rest)) if len(rest) == 2 else {}
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            what = f"loss is {value}" if not math.isfinite(value) else "gradients are not finite"
            raise NonFiniteLossError(f"{what} at step {step}; {self._advice()}")
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if self.config.split_kl:
            value = self._split_update(batch, step, value)
        else:
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for sch in self.schedulers:
            sch.step()
        return value

    def _split_update(self, batch: dict[str, torch.Tensor], step: int, value: float) -> float:
        """:attr:`OptimConfig.split_kl`'s update, the gradients of :meth:`loss` being in place:
        the main optimiser on the likelihood's gradient, then SGD on the KL's, taken after it. Returns
        the loss with the KL as evaluated for the second update."""
        main, kl_sgd = self.optimizers
        main_params = [p for group in main.param_groups for p in group["params"]]
        main.step()
        for p in main_params:
            p.grad = None
        with contextlib.nullcontext() if self.validate_every_step else pyro.validation_enabled(False):
            kl = self.kl_loss(batch, step)
        if kl.requires_grad:
            kl.backward()
        kl_value = float(kl.detach())
        if not math.isfinite(kl_value):
            kl_sgd.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the KL term is {kl_value} at step {step}; {self._advice()}")
        kl_sgd.step()
        kl_sgd.zero_grad(set_to_none=True)
        if "kl" in self.last_terms:
            self.last_terms["kl"] = kl_value
            return self.last_terms["nll"] + kl_value
        return value


    def _backward(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """The loss's gradients; with :attr:`OptimConfig.split_kl` the likelihood's part's alone
        (the ELBO's ``last_terms``), the KL's being taken after the main update."""
        if not self.config.split_kl:
            loss.backward()
            return
        nll = (getattr(self.elbo, "last_terms", None) or {}).get("nll")
        if not torch.is_tensor(nll):
            raise TypeError(f"split_kl needs an ELBO that reports its likelihood term (MeanFieldELBO); "
                            f"{type(self.elbo).__name__} does not")
        (nll / self._examples(batch)).backward()

    def _scale_means(self) -> dict[str, float]:
        """``sigma_mean`` and ``sigma_median``: the guide's posterior standard deviations over all sites,
        for a guide that reports them (:class:`~pyro_llm.guides.ReportsScales`); where BLoB's ``sigma``
        is on its way from its initial value to where the likelihood and the KL balance."""
        scales = guide_scales(self.guide)
        if not scales:
            return {}
        flat = torch.cat([s.detach().reshape(-1).float() for s in scales.values()])
        mean, median = torch.stack([flat.mean(), flat.median()]).tolist()
        return {"sigma_mean": mean, "sigma_median": median}

    def _advice(self) -> str:
        if self.last_checkpoint:
            return (f"nothing was updated from this step; the last good checkpoint (step {self.last_checkpoint}) in "
                    f"{self.run_dir} is kept: continue with --resume and a lower --lr (or --g-lr), or check the data")
        return "nothing was updated from this step and no checkpoint was written; lower the learning rate or check the data"

    def _check_params_finite(self, params: list[torch.Tensor], step: int) -> None:
        """Before a checkpoint: every parameter finite (an update can overflow with finite gradients)."""
        finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()  # one host sync
        bad = [n for n, ok in zip(self.param_names, finite) if not ok]
        if bad:
            raise NonFiniteLossError(f"{len(bad)} parameters (first: {bad[0]}) are not finite after step {step}; "
                                     f"{self._advice()}")

    def fit(self, data: EncodedDataset, *, resume: bool = False, device: torch.device | str | None = None,
            stop_after: int | None = None) -> list[dict[str, float]]:
        """Run ``config.steps`` steps (from the last checkpoint if ``resume``).

        :param stop_after: stop (after checkpointing) once this step is reached; for tests of
            interruption and for chunked runs.
        """
        cfg = self.config
        device = device or self.model.device
        if len(data) < cfg.batch_size:
            raise ValueError(f"the training set has {len(data)} examples, fewer than batch size {cfg.batch_size}")
        rank, _ = ranks.world()
        torch.manual_seed(cfg.seed)
        self._setup(data.batch(self._local(data.training_batch(0, cfg.batch_size, cfg.seed)), device))
        start = 0
        if resume:
            ckpt = find_checkpoint(self.run_dir) if self.run_dir is not None else None
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir}")
            start, self.history, names, optim_state = load_checkpoint(ckpt)
            self.last_checkpoint = start
            if start > cfg.steps or len(self.history) != start:
                raise CorruptFileError(f"checkpoint {ckpt}/state.json says step {start} with {len(self.history)} "
                                       f"history records, of a run of {cfg.steps} steps; it is not this run's")
            if names != self.param_names:
                raise ValueError(f"checkpoint {ckpt} belongs to another model/guide (its parameters differ)")
            self.load_optim_state(optim_state)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        bar = tqdm(range(start, end), desc="svi", disable=not self.progress or rank > 0, initial=start, total=end)
        store = dict(pyro.get_param_store().named_parameters())
        params = [store[n] for n in self.param_names]
        every = max(10, cfg.steps // 100)  # the scales' trajectory: at most about 100 points a run
        sigma = next((h["sigma_mean"] for h in reversed(self.history) if "sigma_mean" in h), None)
        for step in bar:
            t0 = time.perf_counter()
            batch = data.batch(self._local(data.training_batch(step, cfg.batch_size, cfg.seed)), device)
            loss = self.step(batch, step, params)
            terms = dict(self.last_terms)
            if self._point and "kl" in terms:  # a MAP's second term is the prior's penalty, not a KL
                terms["neg_log_prior"] = terms.pop("kl")
            record = {"step": step, "loss": float(loss), **terms, "kl_weight": self.kl_weight(step),
                      "seconds": time.perf_counter() - t0}
            done = step + 1
            if done % every == 0 or done == end:
                record.update(self._scale_means())
            self.history.append(record)
            sigma = record.get("sigma_mean", sigma)
            bar.set_postfix(progress_fields(record, sigma), refresh=False)
            if rank == 0 and self.run_dir is not None and (done % cfg.checkpoint_every == 0 or done == end):
                self._check_params_finite(params, step)
                save_checkpoint(self.run_dir, self.param_names, self.optim_state(), done, self.history)
                self.last_checkpoint = done
        return self.history

