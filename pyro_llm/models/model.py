"""The Pyro model of a LoRA-adapted language model.

Generative story, for a peft model with LoRA layers ``l`` and a data set of size ``N``::

    A_l ~ prior(A_l)                           one sample site per LoRA A matrix (and B_l if b_site)
    B_l, head weights                          pyro.param (deterministic)
    for n in plate("data", N, subsample=batch):
        y_n ~ Categorical(logits = f(x_n; W0, A, B))

``f`` is the frozen transformer with the LoRA update ``W0 + s B A``; the likelihood is scaled by
``N / batch`` by the plate. The frozen base weights never enter Pyro's parameter store. The model
knows nothing of guides: ``AutoDelta`` (MAP), ``AutoNormal``, :class:`~pyro_llm.guides.BLoBGuide`
and :class:`~pyro_llm.guides.LaplaceGuide` all run against it unchanged.

Usage::

    model = BayesianLoRAModel(peft_model, AnswerTokenHead(ids), prior=GaussianPrior(0.2), dataset_size=N)
    guide = BLoBGuide(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.TraceMeanField_ELBO())
    svi.step(**train.batch(idx))
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import nn

from ..priors import PriorLike, as_prior
from .heads import Head
from .lora import Site, attach_sites

__all__ = ["BayesianLoRAModel", "MASKED_LOGIT", "lora_dropout_active"]

#: logit given to answer classes an example does not have (exactly zero probability in float32)
MASKED_LOGIT = -1e9


class BayesianLoRAModel:
    """A callable Pyro model: ``model(input_ids, attention_mask, labels=None, choice_mask=None,
    index=None, token_type_ids=None) -> logits``.

    :param peft_model: a peft model with LoRA adapters (``get_peft_model`` or ``PeftModel``).
    :param head: maps the model and a batch to class logits ``[B, C]``.
    :param prior: anything :func:`~pyro_llm.priors.as_prior` accepts (default ``N(0, 0.2^2)``).
    :param b_site: make the ``B`` matrices sample sites too (Laplace-LoRA's default posterior).
    :param dataset_size: ``N`` of the plate; ``index`` (the batch's row numbers) subsamples it.
    """

    def __init__(self, peft_model: nn.Module, head: Head, prior: PriorLike = None, *, b_site: bool = False,
                 dataset_size: int | None = None, adapter: str = "default") -> None:
        self.peft_model = peft_model
        self.head = head
        self.prior = as_prior(prior)
        self.b_site = b_site
        self.dataset_size = dataset_size
        self.adapter = adapter
        #: the layers whose activations are recomputed in the backward pass (:meth:`enable_gradient_checkpointing`)
        self.checkpointed_layers: list[nn.Module] = []
        self.sites: list[Site] = attach_sites(peft_model, adapter, b_site)
        self._by_name: dict[str, Site] = {s.name: s for s in self.sites}
        for p in peft_model.parameters():
            p.requires_grad_(False)
        # Deterministic trainable weights: B (unless a site) and peft's modules_to_save (classifier heads).
        self.params: dict[str, nn.Parameter] = {}
        site_params = {id(s.module.weight) for s in self.sites}
        for name, p in peft_model.named_parameters():
            if id(p) in site_params:
                continue
            if f".lora_B.{adapter}." in name or (".modules_to_save." in name and f".{adapter}." in name):
                p.requires_grad_(True)
                self.params[name] = p

    # -- introspection ---------------------------------------------------------------------------
    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> Site:
        site = self._by_name.get(name)
        if site is not None:
            return site
        raise KeyError(f"no site named {name!r}; sites: {self.site_names[:4]}...")

    def point_values(self) -> dict[str, torch.Tensor]:
        """The current point value (peft's init, or the mean written back) of every site."""
        return {s.name: s.module.weight.detach() for s in self.sites}

    def sample_prior_hyperparameters(self) -> None:
        """Run only the priors' own sample statements (a hierarchical prior's scale, say) and not
        the LoRA sites or the network: a Pyro model over the hyper-parameters, for a guide of
        them (:class:`~pyro_llm.guides.BLoBGuide` puts an ``AutoNormal`` on it)."""
        for s in self.sites:
            self.prior.prior_dist(s.name, s.layer, s.shape)

    def sample_sites(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        """Sample every LoRA site (and its prior's hyper-parameters) from the prior, and nothing
        else: a Pyro model without the network or the data, whose ELBO against a guide is the
        guide's negative KL alone. The trainer takes the KL's gradient from it where the likelihood's
        and the KL's go to different optimisers (:attr:`~pyro_llm.infer.OptimConfig.split_kl`).
        Arguments (a batch) are accepted and ignored."""
        return {s.name: pyro.sample(s.name, self.prior.prior_dist(s.name, s.layer, s.shape)) for s in self.sites}

    def hyper_site_names(self) -> list[str]:
        """The latent sites the priors sample (none for fixed priors), found by tracing
        :meth:`sample_prior_hyperparameters` alone. A name nested under a LoRA site's name
        (``<site>.tau``) is refused: Pyro's autoguides store a site's parameters at its dotted
        name, where ``<site>`` already holds one (use ``<site>_tau``)."""
        with poutine.block():  # seen by this trace only, never by an enclosing one (a guide's, an ELBO's)
            trace = poutine.trace(self.sample_prior_hyperparameters).get_trace()
        names = [n for n, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]]
        for n in names:
            nested = [s for s in self.site_names if n.startswith(s + ".")]
            if nested:
                raise ValueError(f"prior hyper-parameter site {n!r} is nested under LoRA site {nested[0]!r}; "
                                 f"Pyro's autoguides cannot store both: name it {nested[0]}_<name> instead")
        return names

    def init_loc_fn(self):
        """An ``init_loc_fn`` for Pyro's autoguides that starts every site at its LoRA init
        (``A`` Kaiming-uniform). With ``init_to_median`` ``A = 0`` and ``B = 0`` is a saddle
        where MAP never moves."""
        return init_to_value(values=self.point_values(), fallback=init_to_median)

    @property
    def device(self) -> torch.device:
        return self.sites[0].module.weight.device

    # -- forward -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use_values(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Run the network with these site values, restoring the modules afterwards."""
        try:
            for s in self.sites:
                if s.name in values:
                    s.module.value = values[s.name]
            yield
        finally:
            for s in self.sites:
                s.module.value = None

    def _sample_shape(self, values: Mapping[str, torch.Tensor]) -> torch.Size:
        """The batch shape the sites' values carry beyond their own shape, trailing ones dropped:
        ``()`` normally, ``(S,)`` under a vectorised plate left of the data plate
        (``Predictive(parallel=True)`` hands global sites over as ``S x shape`` or ``S x 1 x shape``;
        vectorised ELBO particles). The logits then get shape ``S x batch x classes``."""
        leads = set()
        for s in self.sites:
            lead = list(values[s.name].shape[:values[s.name].dim() - len(s.shape)])
            while lead and lead[-1] == 1:
                lead.pop()
            leads.add(tuple(lead))
        if len(leads) != 1:
            raise ValueError(f"site values carry different batch shapes {sorted(leads)}; sample every site "
                             "under the same plates")
        return torch.Size(leads.pop())

    def use_values(self, values: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Deprecated: the sites' values as module state for a block; use :meth:`logits_at`, which
        takes them as an argument."""
        warnings.warn("BayesianLoRAModel.use_values is deprecated; use model.logits_at(batch, values)",
                      DeprecationWarning, stacklevel=2)
        return self._use_values(values)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, choice_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits at the adapter's own weights (or inside the deprecated :meth:`use_values`);
        :meth:`logits_at` is the same forward with the site values as an argument."""
        return self.logits_at({"input_ids": input_ids, "attention_mask": attention_mask, "choice_mask": choice_mask,
                               "token_type_ids": token_type_ids})

    def enable_gradient_checkpointing(self) -> None:
        """transformers' activation checkpointing of every layer (non-reentrant): under a gradient a
        layer keeps only its input and recomputes its activations in the backward pass, trading a
        second forward for the memory of every layer's activations. Flipout replays its signs in the
        recomputation (:class:`~pyro_llm.poutine.FlipoutMessenger`), so gradients are those without
        checkpointing. Passes without a gradient (prediction) run as before, caches included."""
        base = self.peft_model.get_base_model()
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
        with warnings.catch_warnings():  # transformers 5 renames it; the old name is the one every version has
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated", category=FutureWarning)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                              "context_fn": self._checkpoint_contexts})
        self.checkpointed_layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``torch.utils.checkpoint``'s ``context_fn``: the sites' values of a layer's first pass are
        put back for its recomputation in the backward pass (the model clears them after the forward)."""
        snapshot = [(s.module, s.module.value) for s in self.sites]
        return contextlib.nullcontext(), _values_restored(snapshot)

    @contextlib.contextmanager
    def _checkpointing(self) -> Iterator[None]:
        """The checkpointed layers in training mode (transformers checkpoints a layer only then),
        without touching their submodules (dropout stays off), while gradients are being taken."""
        layers = self.checkpointed_layers if torch.is_grad_enabled() else []
        for layer in layers:
            layer.training = True
        try:
            yield
        finally:
            for layer in layers:
                layer.training = False

    def logits_at(self, batch: Mapping[str, torch.Tensor | None],
                  values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Class logits (float32) of ``batch`` with the sites at ``values`` (default: the adapter's own
        weights), outside Pyro: the deterministic forward that prediction, the GLM predictive and
        K-FAC differentiate. ``values`` may carry a leading sample dimension ``S``; the batch must then
        be ``S`` stacked copies. Keys of ``batch`` other than the inputs (labels, index) are ignored."""
        with self._use_values(values) if values else contextlib.nullcontext(), self._checkpointing():
            logits = self.head(self.peft_model, batch["input_ids"], batch["attention_mask"],
                               batch.get("token_type_ids")).float()
        choice_mask = batch.get("choice_mask")
        if choice_mask is not None:
            logits = logits.masked_fill(~choice_mask.to(logits.device), MASKED_LOGIT)
        return logits

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                 choice_mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        for name, p in self.params.items():
            stored = pyro.param(name, p)
            if stored is not p:
                raise RuntimeError(
                    f"Pyro's parameter store holds another tensor named {name!r} (from an earlier model); "
                    "call pyro.clear_param_store() before building a new model")
        values = {s.name: pyro.sample(s.name, self.prior.prior_dist(s.name, s.layer, s.shape)) for s in self.sites}
        lead = self._sample_shape(values)
        if lead:  # a vectorised plate outside the model: one pass over S stacked copies of the batch
            copies = lead.numel()
            values = {s.name: values[s.name].reshape(copies, *s.shape) for s in self.sites}
            input_ids, attention_mask, choice_mask, token_type_ids = (
                None if t is None else t.repeat(copies, *([1] * (t.dim() - 1)))
                for t in (input_ids, attention_mask, choice_mask, token_type_ids))
        logits = self.logits_at({"input_ids": input_ids, "attention_mask": attention_mask, "choice_mask": choice_mask,
                                 "token_type_ids": token_type_ids}, values)
        if lead:
            logits = logits.reshape(*lead, -1, logits.shape[-1])
        batch = logits.shape[-2]
        if self.dataset_size is not None and index is not None:
            plate = pyro.plate("data", self.dataset_size, subsample=index.to(logits.device))
        else:
            plate = pyro.plate("data", batch)
        with plate:
            pyro.deterministic("logits", logits, event_dim=1)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=labels)
        return logits


@contextlib.contextmanager
def _values_restored(snapshot: list[tuple[nn.Module, torch.Tensor | None]]) -> Iterator[None]:
    before = [(module, module.value) for module, _ in snapshot]
    for module, value in snapshot:
        module.value = value
    try:
        yield
    finally:
        for module, value in before:
            module.value = value


@contextlib.contextmanager
def lora_dropout_active(model: BayesianLoRAModel, enabled: bool = True) -> Iterator[None]:
    """Switch peft's LoRA-input dropout on (training with dropout; MC dropout at prediction),
    leaving every other module in eval mode."""
    layers = [s.layer.lora_dropout[model.adapter] for s in model.sites if s.matrix == "A"] if enabled else []
    try:
        for d in layers:
            d.train()
        yield
    finally:
        for d in layers:
            d.eval()
