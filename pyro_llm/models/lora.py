"""LoRA matrices as Pyro sites: discovery, the site module, and the effectful LoRA product.

peft's ``lora.Linear`` computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))``. pyro-llm
replaces the ``lora_A[adapter]`` module (and ``lora_B[adapter]`` when ``B`` is a site too) by a
:class:`LoRASite` that keeps peft's ``weight`` attribute (peft reads its dtype, and adapters are
saved from it) but computes its product through :func:`lora_product`, a named effectful
operation. Effect handlers such as :class:`~pyro_llm.poutine.FlipoutMessenger` intercept that
operation by site name; nothing in torch is monkey-patched.

Site names are the contract: ``<module path of the LoRA layer>.lora_A`` (and ``.lora_B``), the
path taken from the peft model, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A``:
peft's own parameter name of the matrix without ``.<adapter>.weight``. The full path matters.
Pyro's autoguides store a site's parameters as nested attributes named by the site's dotted
name, and ``AutoDelta`` sets them on the guide itself: a name whose first part is an attribute of
the guide (Llama's ``model.``, which is ``AutoGuide.model``) would land on that attribute and never
be registered. peft's ``base_model.`` prefix is no guide attribute, and :func:`attach_sites`
refuses any name whose first part is. Layers are found by type (peft's ``LoraLayer``) and adapter
name, never by string matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from pyro.poutine.runtime import effectful
from torch import nn

__all__ = ["LoRASite", "Site", "attach_sites", "check_site_name", "find_lora_layers", "lora_product", "site_name"]



def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``; a weight with a leading sample dimension ``S`` (shape ``S x out x in``)
    multiplies the ``S`` equal chunks of the batch (``x`` of shape ``S*B x ... x in``), so ``S``
    weight samples are evaluated in one batched pass."""
    weight = weight.to(x.dtype)
    if weight.dim() == 2:
        return F.linear(x, weight)
    samples = weight.shape[0]
    lead = x.shape[:-1]
    xs = x.reshape(samples, -1, x.shape[-1])
    out = torch.bmm(xs, weight.transpose(-1, -2))
    return out.reshape(*lead, weight.shape[-2])


#: The effectful LoRA product: ``lora_product(x, weight, name=site)`` is ``x @ weight.T`` unless
#: a handler (Flipout) answers the ``"lora_product"`` message for that site first.
lora_product = effectful(_product, type="lora_product")


class LoRASite(nn.Module):
    """Stands in for peft's ``lora_A[adapter]`` (or ``lora_B``) ``nn.Linear``.

    ``weight`` (shape ``out x in``) is the point value (peft's initialisation, later the
    posterior mean written back for saving); it does not train. ``value`` is the current sample
    of the site, set by the Pyro model for one forward pass.
    """

    def __init__(self, name: str, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError(f"{name}: LoRA matrices with a bias cannot be sites")
        self.site_name = name
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.value if self.value is not None else self.weight
        return lora_product(x, w, name=self.site_name)

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, in_features={self.in_features}, out_features={self.out_features}"


@dataclass
class Site:
    """One LoRA matrix declared as a Pyro sample site."""

    name: str
    module: LoRASite
    layer: LoraLayer
    matrix: str  # "A" or "B"

    @property
    def shape(self) -> torch.Size:
        return self.module.weight.shape


def site_name(module_path: str, matrix: str) -> str:
    return f"{module_path}.lora_{matrix}"


def _reserved_names() -> frozenset[str]:
    """Attribute names of Pyro's autoguides: a site name may not begin with one (module docstring)."""
    from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

    return frozenset(n for cls in (AutoDelta, AutoNormal, AutoGuideList) for n in dir(cls))


def check_site_name(name: str) -> None:
    """Raise if Pyro's autoguides could not store parameters under ``name`` (module docstring)."""
    head = name.split(".", 1)[0]
    if head in _reserved_names():
        raise ValueError(f"site name {name!r} begins with {head!r}, an attribute of Pyro's autoguides, which "
                         "would store its parameters on that attribute; pass the peft model itself "
                         "(get_peft_model / PeftModel), whose module paths begin with 'base_model.'")


def find_lora_layers(model: nn.Module, adapter: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """``(module path, layer)`` for every peft LoRA layer that carries ``adapter``."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if not isinstance(module.lora_A[adapter], (nn.Linear, LoRASite)):
                raise TypeError(f"{path}: only linear LoRA layers can be sites, got {type(module.lora_A[adapter])}")
            yield path, module


def attach_sites(model: nn.Module, adapter: str = "default", b_site: bool = False) -> list[Site]:
    """Replace the LoRA ``A`` (and ``B`` if ``b_site``) linears by :class:`LoRASite` modules.

    Idempotent: layers already converted are reused. Returns the sites in module order.
    """
    sites: list[Site] = []
    for path, layer in find_lora_layers(model, adapter):
        for matrix in ("A", "B") if b_site else ("A",):
            holder = layer.lora_A if matrix == "A" else layer.lora_B
            current = holder[adapter]
            name = site_name(path, matrix)
            check_site_name(name)
            if not isinstance(current, LoRASite):
                current = LoRASite(name, current)
                holder[adapter] = current
            sites.append(Site(name, current, layer, matrix))
    if not sites:
        raise ValueError(f"no LoRA layers with adapter {adapter!r} found: is this a peft LoRA model?")
    return sites
