"""One reparametrised Normal draw for many sites at once, handed out site by site.

A mean-field Gaussian guide over sixty LoRA matrices costs, done site by site, sixty noise draws,
sixty ``loc + scale * noise``, sixty KLs and their backward passes: a few hundred small kernels a
step, which on a GPU cost more than the arithmetic. :class:`FlatNormal` keeps every site's
``loc`` and ``scale`` as pieces of two flat tensors and draws ``value = loc + scale * noise`` for
all of them in three kernels; each site's distribution is a :class:`NormalPiece`, an ordinary
``Normal`` (so Pyro, ``kl_divergence`` and every ELBO see what they always see) whose
``rsample()`` returns that site's piece of the joint draw.

Consumers that know the protocol use the flat tensors directly: the mean-field ELBO computes one
KL over the whole draw when every piece is in the trace (:mod:`pyro_llm.infer.elbo`), and Flipout
reads the noise of a group of sites as one contiguous block (:mod:`pyro_llm.poutine.flipout`).
Sites are laid out row-major in the order given, so the sites of a group that are neighbours
there (``q_proj`` and ``v_proj`` of one layer) are one ``(r_q + r_v) x d`` block of each flat
tensor: a view, no copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as dist
import torch

__all__ = ["FlatNormal", "NormalPiece", "base_distribution"]


def base_distribution(fn: object) -> object:
    """``fn`` without its ``Independent`` wrappers (the per-entry distribution of a site)."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn


class FlatNormal:
    """``N(loc, scale^2)`` over the concatenation of sites of the given ``shapes``, drawn once.

    :param loc: flat means, ``sum(prod(shape))`` entries.
    :param scale: flat standard deviations, same size.
    :param names: the site of each shape (their order is the layout).
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, names: Sequence[str],
                 shapes: Sequence[torch.Size]) -> None:
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        if loc.dim() != 1 or loc.shape != scale.shape or loc.numel() != sum(self.sizes):
            raise ValueError(f"loc and scale must be flat with {sum(self.sizes)} entries, got "
                             f"{tuple(loc.shape)} and {tuple(scale.shape)}")
        self.loc, self.scale = loc, scale
        self.index = {n: i for i, n in enumerate(self.names)}
        self.noise = scale * torch.randn_like(loc)  # scale * E, kept: Flipout perturbs with it
        self.value = loc + self.noise
        self._pieces: dict[str, tuple[torch.Tensor, ...]] = {}
        # (dtype, the ranges cut) -> (first, end) site range -> (loc, noise) block
        self._blocks: dict[tuple[torch.dtype, tuple[tuple[int, int], ...]],
                           dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}

    def _split(self, what: str) -> tuple[torch.Tensor, ...]:
        if what not in self._pieces:
            flat = getattr(self, what)
            self._pieces[what] = tuple(p.view(s) for p, s in zip(flat.split(self.sizes), self.shapes))
        return self._pieces[what]

    def site(self, name: str) -> "NormalPiece":
        """The distribution of site ``name``: its piece of ``loc`` and ``scale``, and of the draw."""
        i = self.index[name]
        return NormalPiece(self._split("loc")[i], self._split("scale")[i], self, name)

    def piece(self, what: str, name: str) -> torch.Tensor:
        """Site ``name``'s piece of ``"loc"``, ``"scale"``, ``"noise"`` or ``"value"``."""
        return self._split(what)[self.index[name]]

    def _range(self, names: Sequence[str]) -> tuple[int, int] | None:
        """``(first, end)`` indices when ``names`` are neighbours in the layout, in order."""
        first = self.index.get(names[0]) if names else None
        if first is None or any(self.index.get(n) != first + k for k, n in enumerate(names)):
            return None
        return first, first + len(names)

    def block(self, names: Sequence[str], groups: Sequence[Sequence[str]], dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(loc, noise)`` rows of ``names`` stacked, as views of the flat tensors cast once to
        ``dtype``, or ``None`` when ``names`` are not neighbours of equal width in the layout.

        ``groups`` (every group of sites that will ask, in any order) fixes one split of the flat
        tensors into blocks for the whole draw: one split node each, whose backward is one
        concatenation, where a block per group would cost a full-size gradient per group."""
        own = self._range(names)
        if own is None:
            return None
        ranges = dict(r for r in (self._range(g) for g in groups) if r is not None)
        ranges[own[0]] = own[1]
        key = (dtype, tuple(sorted(ranges.items())))
        if key not in self._blocks:
            self._blocks[key] = self._cut(sorted(ranges.items()), dtype)
        return self._blocks[key].get(own)

    def _cut(self, ranges: list[tuple[int, int]], dtype: torch.dtype
             ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """Split the flat ``loc`` and ``noise`` (cast to ``dtype``) at the ``ranges`` of sites (and
        the stretches between them); the blocks whose sites are matrices of one width, as matrices."""
        bounds, i = [], 0
        for start, end in ranges:
            if start < i:  # overlaps a range already cut
                continue
            if start > i:
                bounds.append((i, start))
            bounds.append((start, end))
            i = end
        if i < len(self.names):
            bounds.append((i, len(self.names)))
        sizes = [sum(self.sizes[a:b]) for a, b in bounds]
        loc, noise = (t.to(dtype).split(sizes) for t in (self.loc, self.noise))
        out = {}
        for (a, b), l_piece, n_piece in zip(bounds, loc, noise):
            width = self.shapes[a][-1]
            if all(len(s) == 2 and s[1] == width for s in self.shapes[a:b]):
                out[(a, b)] = (l_piece.view(-1, width), n_piece.view(-1, width))
        return out


class NormalPiece(dist.Normal):
    """A site's ``Normal`` whose ``rsample()`` is its piece of the :class:`FlatNormal` draw.

    Any other use (a sample shape, an expanded copy under a vectorised plate) draws afresh, as a
    plain ``Normal`` would, so the distribution is exactly ``N(loc, scale^2)`` either way."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, whole: FlatNormal, name: str) -> None:
        super().__init__(loc, scale, validate_args=False)
        self.whole, self.name = whole, name

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if not sample_shape:  # an expanded copy is a plain Normal (expand below), so whole is set
            value = self.whole.piece("value", self.name)
            if value.shape == self.batch_shape:
                return value
        return super().rsample(sample_shape)

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> dist.Normal:
        return dist.Normal(self.loc, self.scale, validate_args=False).expand(batch_shape)
