"""Flipout (Wen et al. 2018) as a Pyro effect handler over the LoRA product.

Inside ``with flipout():`` the handler remembers, for every latent site, the Normal
distribution the *guide* samples it from (``q(A) = N(M, sigma^2)``), and answers each
``lora_product(x, A, name=site)`` message with

    h = x M^T + ((x * s_in) (A - M)^T) * s_out,       s_in in {+-1}^{d_in}, s_out in {+-1}^{r}

with fresh signs for every row of ``x`` (each token of each example). ``A - M = sigma * E`` is
the guide's own reparametrised noise, so gradients reach ``M``, ``sigma`` and the inputs, and the
ELBO's KL and log-density terms are untouched. The handler draws that noise itself when the guide
samples the site (``A = M + sigma * E``, exactly the reparametrised draw ``Normal.rsample`` makes)
and keeps ``sigma * E``, so the product does not recover it as ``A - M``: with a closed-form KL
``A`` itself then has no consumer and no backward. Every row's perturbation has exactly the marginal
``N(0, sigma^2)`` it has without Flipout, but rows are decorrelated, which lowers the variance of
the gradient estimate at the cost of one extra rank-``r`` product.

The guide's distribution of a site is Normal for :class:`~pyro_llm.guides.BLoBGuide` and for
Pyro's ``AutoNormal`` on a real-valued site (an auxiliary ``<site>_unconstrained`` Normal, the
site a ``Delta`` exactly on its value: the handler recognises the pair by the value's identity
and perturbs with the auxiliary draw). Sites whose guide marginal is not Normal (``AutoDelta``'s
point masses, a low-rank or Kronecker-factored joint) pass through unchanged, and the handler
says so once, at the end of the pass, with a :class:`FlipoutNotApplied` warning naming those LoRA
sites (``warn=False`` keeps it quiet); products with a leading sample dimension (a vectorised
``Predictive``) pass through too. Use it around whatever runs guide *and* model (an ELBO call,
``SVI.step``, ``Predictive``)::

    with flipout():
        loss = elbo.differentiable_loss(model, guide, **batch)

To train over many steps, keep one handler and enter it at each step (``SVITrainer`` does): from the
second step on it computes the products of sites that read the same input together
(:class:`FlipoutMessenger`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from ..distributions import FlatNormal, NormalPiece, base_distribution

__all__ = ["FlipoutMessenger", "FlipoutNotApplied", "SIGN_METHODS", "flipout", "flipout_product", "rademacher"]


_AFFINE: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _signs_by_randint(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """One ``randint`` of ``{0, 1}`` in ``like``'s dtype (Philox counters on CUDA; no table, no cast),
    mapped to ``2 b - 1`` by one ``addcmul`` against two cached scalars: two kernels."""
    key = (like.dtype, like.device)
    if key not in _AFFINE:
        _AFFINE[key] = (torch.tensor(-1.0, dtype=like.dtype, device=like.device),
                        torch.tensor(2.0, dtype=like.dtype, device=like.device))
    minus_one, two = _AFFINE[key]
    return torch.addcmul(minus_one, torch.randint(0, 2, shape, dtype=like.dtype, device=like.device), two)


def _signs_by_table(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Random 32-bit words read as bytes, each byte eight signs looked up in a ``256 x 8`` table:
    one draw per 32 signs instead of one per sign, which is what costs on a CPU; on a GPU the
    gather is the slow part, so CUDA uses :func:`_signs_by_randint`."""
    key = (like.dtype, like.device)
    if key not in _TABLES:
        bits = torch.arange(256, device=like.device)[:, None].bitwise_right_shift(torch.arange(8, device=like.device)) & 1
        _TABLES[key] = bits.to(like.dtype).mul_(2).sub_(1)
    n = math.prod(shape)
    words = torch.randint(-2 ** 31, 2 ** 31, ((n + 31) // 32,), dtype=torch.int32, device=like.device)
    return _TABLES[key].index_select(0, words.view(torch.uint8).int()).reshape(-1)[:n].reshape(shape)


#: How Flipout makes its signs on each device type (others: ``"randint"``). ``bench.bench_ops`` sets
#: ``"cpu"`` to ``"randint"`` to count on the CPU the kernels a GPU runs.
SIGN_METHODS: dict[str, str] = {"cpu": "table"}


def rademacher(shape: torch.Size | tuple[int, ...], like: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Independent uniform ``+-1`` entries of ``like``'s dtype and device.

    :param method: ``"randint"`` (one draw per sign, in the activation dtype: the GPU's way) or
        ``"table"`` (one draw per 32 signs and a table lookup: the CPU's way); default by device
        type, from :data:`SIGN_METHODS`. ``tests/guides/test_blob.py`` checks the distribution of
        both on the CPU."""
    method = method or SIGN_METHODS.get(like.device.type, "randint")
    draw = {"randint": _signs_by_randint, "table": _signs_by_table}[method]
    return draw(tuple(shape), like)


def flipout_product(x: torch.Tensor, loc: torch.Tensor, delta: torch.Tensor,
                    x_flipped: torch.Tensor | None = None, s_out: torch.Tensor | None = None) -> torch.Tensor:
    """``x loc^T + ((x * s_in) delta^T) * s_out`` with independent Rademacher signs per row.

    :param x_flipped: ``x * s_in`` when already drawn, to share one input sign draw (and its
        product) between products of the same ``x``; drawn here otherwise.
    :param s_out: the output signs (``x``'s rows by ``loc``'s rows) when already drawn.
    """
    loc, delta = loc.to(x.dtype), delta.to(x.dtype)
    if x_flipped is None:
        x_flipped = x * rademacher(x.shape, x)
    if s_out is None:
        s_out = rademacher(x.shape[:-1] + (loc.shape[0],), x)
    return torch.addcmul(F.linear(x, loc), F.linear(x_flipped, delta), s_out)


class FlipoutNotApplied(UserWarning):
    """Flipout was asked for, but some LoRA sites' guide distributions are not Normal marginals."""


def _normal_base(fn: object) -> dist.Normal | None:
    fn = base_distribution(fn)
    return fn if isinstance(fn, dist.Normal) else None


def _draw(base: dist.Normal) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc + scale * E, scale * E)``: the reparametrised draw ``Normal.rsample`` makes, and its noise."""
    noise = base.scale * torch.randn_like(base.loc)
    return base.loc + noise, noise


@dataclass
class _Input:
    """What Flipout keeps about one input tensor ``x`` while the sites that read it run."""

    x: torch.Tensor
    flipped: torch.Tensor | None = None  # x * s_in: one sign draw per input, shared by its sites
    sites: list[str] = field(default_factory=list)  # the sites that read x, in call order
    ahead: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # site -> (A, product)


class FlipoutMessenger(Messenger):
    """Answers ``lora_product`` messages with the Flipout estimator (module docstring).

    Sites fed the very same input tensor (``q_proj`` and ``v_proj`` of one attention layer) share
    one draw of ``s_in`` and so one product ``x * s_in`` (and its backward). Given the signs, each
    site's perturbation is still its own independent ``N(0, sigma^2)`` (the ``E``'s and the
    ``s_out``'s are independent), so marginals, independence across sites and the decorrelation
    across rows are unchanged (``tests/guides/test_blob.py``).

    The handler also remembers which sites read one input, in which order. A handler that is
    entered again (``SVITrainer`` keeps one for all its steps) computes the products of such a
    group at its first site in one pass, with the group's ``M``'s and noises stacked, and hands the
    later sites their slice when they arrive with the same input and the same ``A``: half the
    matrix products of a q/v pair and their backward, for the same numbers. A site that arrives
    with another input or another value is computed on its own, so a stale group costs time,
    never correctness.

    :param sites: restrict Flipout to these site names (default: every site with a Normal guide).
    :param warn: say which LoRA sites it leaves alone (:class:`FlipoutNotApplied`), once each; off
        where Flipout is applied wherever it can be without anyone having asked for it.
    :param shared_blocks: read a group's means and noise as views of one split of the joint draw's
        flat tensors, made at the first product of a pass and shared by all (fewer kernels). Off
        under activation checkpointing, where a recomputed layer must redo every operation of its
        first pass: each product then slices and stacks its own.
    """

    def __init__(self, sites: Iterable[str] | None = None, warn: bool = True, shared_blocks: bool = True) -> None:
        super().__init__()
        self.sites = None if sites is None else frozenset(sites)
        self.warn = warn
        self.shared_blocks = shared_blocks
        self._q: dict[str, dist.Normal] = {}
        self._noise: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> (A, sigma * E)
        self._input: _Input | None = None
        self._groups: dict[str, tuple[str, ...]] = {}  # first site of an input -> all its sites, kept across entries
        self._learnt: dict[str, tuple[str, ...]] = {}  # groups seen in this entry, in force from the next
        self._whole: dict[str, FlatNormal] = {}  # site -> the joint draw it is a piece of
        self._auxiliary: dict[int, tuple[dist.Normal, torch.Tensor, torch.Tensor]] = {}  # id(value) -> (q, value, noise)
        self._skipped: dict[str, str] = {}  # site -> its guide distribution's type, when not a Normal marginal
        self._unapplied: set[str] = set()  # LoRA products of skipped sites met in this entry
        self._warned: set[str] = set()

    def __enter__(self) -> "FlipoutMessenger":
        self._q, self._noise, self._input, self._auxiliary, self._whole = {}, {}, None, {}, {}
        return super().__enter__()

    def __exit__(self, *args: object) -> None:
        self._close_input()
        self._warn_unapplied()
        self._groups.update(self._learnt)
        self._learnt = {}
        self._noise, self._auxiliary, self._whole = {}, {}, {}
        return super().__exit__(*args)

    def _close_input(self) -> None:
        """Remember which sites read the input that is done with. The grouping takes effect at the
        next entry, so that within one entry every pass makes its products, and draws its signs, in
        the same order: a layer recomputed under activation checkpointing (its RNG state restored
        by ``torch.utils.checkpoint``) draws the very signs of its first pass."""
        if self._input is not None and self._input.sites:
            self._learnt[self._input.sites[0]] = tuple(self._input.sites)
        self._input = None

    def _pyro_sample(self, msg: Message) -> None:
        # The guide's draw arrives with no value yet; the model's replayed site already carries
        # the guide's value and is skipped, so the prior never overrides q.
        name = msg["name"]
        if msg["is_observed"] or msg["value"] is not None or name is None:
            return
        if msg["infer"].get("is_auxiliary"):  # AutoNormal's <site>_unconstrained: draw it, pair it later
            base = _normal_base(msg["fn"])
            if base is not None and base.loc.shape == base.scale.shape == msg["fn"].shape():
                msg["value"], noise = _draw(base)
                self._auxiliary[id(msg["value"])] = (base, msg["value"], noise)
            return
        if self.sites is not None and name not in self.sites:
            return
        fn = base_distribution(msg["fn"])
        if isinstance(fn, dist.Delta) and id(fn.v) in self._auxiliary and self._auxiliary[id(fn.v)][1] is fn.v:
            base, value, noise = self._auxiliary[id(fn.v)]  # the identity transform of a Normal draw
            self._q[name] = base
            msg["value"] = value
            self._noise[name] = (value, noise)
            return
        base = _normal_base(msg["fn"])
        if base is None:
            self._q.pop(name, None)
            self._skipped[name] = type(fn).__name__
            return
        self._q[name] = base
        if isinstance(base, NormalPiece) and base.loc.shape == msg["fn"].shape():  # a piece of a joint draw
            msg["value"] = base.rsample()
            self._noise[name] = (msg["value"], base.whole.piece("noise", name))
            self._whole[name] = base.whole
        elif base.loc.shape == base.scale.shape == msg["fn"].shape():  # no broadcasting: draw here
            msg["value"], noise = _draw(base)
            self._noise[name] = (msg["value"], noise)

    def _warn_unapplied(self) -> None:
        """One warning per handler naming the LoRA sites whose products Flipout left alone in this
        entry (sites without a LoRA product, such as a prior's hyper-parameters, are not named)."""
        names = sorted(self._unapplied - self._warned)
        self._unapplied = set()
        if not names or not self.warn:
            return
        self._warned.update(names)
        kinds = sorted({self._skipped.get(n, "?") for n in names})
        warnings.warn(f"Flipout does not apply to {len(names)} LoRA site(s) whose guide distribution is not a "
                      f"Normal marginal ({', '.join(kinds)}): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}; "
                      "their products use the sampled weights as they are", FlipoutNotApplied, stacklevel=3)

    def _pyro_lora_product(self, msg: Message) -> None:
        name = msg["name"] or ""
        if name in self._skipped and name not in self._q:
            self._unapplied.add(name)
        if name not in self._q or msg["done"]:
            return
        x, weight = msg["args"]
        if weight.dim() != 2:
            return
        if self._input is None or self._input.x is not x:
            self._close_input()
            self._input = _Input(x)
        inp = self._input
        inp.sites.append(name)
        ahead = inp.ahead.pop(name, None)
        if ahead is not None and ahead[0] is weight:
            msg["value"] = ahead[1]
        else:  # this site and the later sites that read this input last time, if their A is drawn
            later = [s for s in self._groups.get(name, ())[1:]
                     if s in self._noise and s not in inp.sites and s not in inp.ahead]
            msg["value"] = self._products(inp, [(name, weight)] + [(s, self._noise[s][0]) for s in later])
        msg["done"] = True
        msg["infer"]["flipout"] = True

    def _loc_delta(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, A - M)`` of a site: the noise drawn with this very ``A``, or (a value replaced by
        another handler) ``A - M`` read back."""
        loc = self._q[name].loc.expand(weight.shape)
        drawn = self._noise.get(name)
        return loc, drawn[1] if drawn is not None and drawn[0] is weight else weight - loc

    def _products(self, inp: _Input, members: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The Flipout products of ``members`` (site, A) with ``inp.x`` in one pass; returns the
        first one's and keeps the others' in ``inp.ahead``."""
        x = inp.x
        loc, delta = self._stacked(members, x.dtype)
        ranks = [w.shape[0] for _, w in members]
        if inp.flipped is None:  # s_in and these sites' s_out in one draw
            d_in = x.shape[-1]
            signs = rademacher(x.shape[:-1] + (d_in + sum(ranks),), x)
            inp.flipped, s_out = x * signs[..., :d_in], signs[..., d_in:]
        else:
            s_out = rademacher(x.shape[:-1] + (sum(ranks),), x)
        product = flipout_product(x, loc, delta, inp.flipped, s_out)
        if len(members) == 1:
            return product
        pieces = product.split(ranks, dim=-1)
        for (name, weight), piece in zip(members[1:], pieces[1:]):
            inp.ahead[name] = (weight, piece)
        return pieces[0]

    def _stacked(self, members: list[tuple[str, torch.Tensor]], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, A - M)`` of ``members`` with their rows stacked: a view of the joint draw's flat
        tensors when the members are neighbours there and drew exactly these ``A``, else stacked."""
        names = [name for name, _ in members]
        whole = self._whole.get(names[0])
        if self.shared_blocks and whole is not None and all(self._whole.get(n) is whole and self._noise[n][0] is w for n, w in members):
            block = whole.block(names, list(self._groups.values()), dtype)
            if block is not None:
                return block
        parts = [self._loc_delta(name, weight) for name, weight in members]
        if len(parts) == 1:
            return parts[0]
        loc, delta = (torch.cat(t) for t in zip(*parts))
        return loc, delta


def flipout(fn=None, sites: Iterable[str] | None = None):
    """Flipout handler: a context manager, or a decorator when given ``fn``."""
    messenger = FlipoutMessenger(sites=sites)
    return messenger(fn) if fn is not None else messenger
