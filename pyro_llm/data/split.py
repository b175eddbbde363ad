"""Deterministic, seeded train / validation / test splits of sources that ship one split only.

Most offline benchmark copies hold just the validation split. pyro-llm then splits what exists:
examples are grouped by their text (so duplicated questions never straddle two splits), the
groups are permuted with ``numpy.random.default_rng(split_seed)`` and cut at the fractions
(default 60 % train, 10 % validation, 30 % test). ``split_seed`` is independent of the training
seed, so every training seed sees the same test set.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .examples import Example

__all__ = ["SPLITS", "DEFAULT_FRACTIONS", "seeded_split"]

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.6, 0.1, 0.3)


def _group_key(ex: Example) -> str:
    return hashlib.sha1(f"{ex.text}\x00{ex.text_pair or ''}".encode()).hexdigest()


def seeded_split(
    examples: Sequence[Example],
    split: str,
    split_seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> list[Example]:
    """Return the ``split`` part of ``examples`` (order within a split follows the source)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    keys = sorted({_group_key(ex) for ex in examples})
    order = np.random.default_rng(split_seed).permutation(len(keys))
    n_train = int(round(fractions[0] * len(keys)))
    n_val = int(round(fractions[1] * len(keys)))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
              "test": (n_train + n_val, len(keys))}
    lo, hi = bounds[split]
    chosen = {keys[i] for i in order[lo:hi]}
    return [ex for ex in examples if _group_key(ex) in chosen]
