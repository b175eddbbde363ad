"""Learning-rate and KL-weight schedules, as plain functions of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

__all__ = ["KLSchedule", "ConstantKL", "LinearKLAnnealing", "BlobKLReweighting", "blob_cycle_length",
           "warmup_decay"]


class KLSchedule(Protocol):
    """``w(step)``: the weight of the KL term relative to the exact ELBO (``w = 1``)."""

    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class ConstantKL:
    """``w = weight`` throughout (``1``: the exact ELBO, the default)."""

    weight: float = 1.0

    def __call__(self, step: int) -> float:
        return self.weight


@dataclass(frozen=True)
class LinearKLAnnealing:
    """``w`` rises linearly from ``start`` to ``end`` over ``steps`` steps, then stays at ``end``."""

    steps: int
    start: float = 0.0
    end: float = 1.0

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return self.end
        t = min(step / self.steps, 1.0)
        return self.start + t * (self.end - self.start)


@dataclass(frozen=True)
class BlobKLReweighting:
    """BLoB's (Blundell et al. 2015) minibatch reweighting, as a weight on the exact ELBO.

    The reference minimises ``mean NLL + pi_i KL`` with ``pi_i = 2^i / (2^(M+1) - 1)``, ``i``
    cycling over ``1..M`` minibatches of an epoch. Multiplying by ``N`` gives the exact ELBO's
    likelihood term ``(N/B) sum NLL`` plus ``N pi_i KL``, i.e. ``w_i = N pi_i``. For large ``M``
    ``pi_i`` underflows to 0 for early ``i``; it is computed in log space.

    The cycle length ``M`` (``batches_per_epoch``) is the number of minibatches of an epoch in
    Blundell et al.; the BLoB reference's Llama recipe sets it by dataset rescaling instead
    (:func:`blob_cycle_length`).
    """

    dataset_size: int
    batches_per_epoch: int

    def __call__(self, step: int) -> float:
        m = max(self.batches_per_epoch, 1)
        i = step % m + 1
        log_pi = i * math.log(2.0) - ((m + 1) * math.log(2.0) + math.log1p(-(2.0 ** -(m + 1))))
        return self.dataset_size * math.exp(log_pi)


def blob_cycle_length(dataset_size: int, batch_size: int, gamma: float = 8.0) -> int:
    """The BLoB reference's cycle length under ``--bayes-datasetrescaling``:
    ``M = int(100 * N^(pi / gamma) / B)`` (``pi`` the number 3.14159..., not a KL weight), at least 1.
    87 training examples at batch 8 give 72, 2251 at batch 4 give 518."""
    if dataset_size < 1 or batch_size < 1 or not gamma > 0:
        raise ValueError(f"blob_cycle_length needs N >= 1, B >= 1, gamma > 0; got {dataset_size}, {batch_size}, {gamma}")
    return max(int(100 * dataset_size ** (math.pi / gamma) / batch_size), 1)


def warmup_decay(total_steps: int, warmup_ratio: float, decay: str = "linear") -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_ratio * total`` steps, then linear decay to 0
    (``decay="linear"``) or constant (``decay="constant"``): transformers'
    ``get_linear_schedule_with_warmup``, which the BLoB reference uses for both its optimisers
    (the warm-up length is not rounded, and the first step's factor is 0)."""
    warm = warmup_ratio * total_steps
    if decay not in ("linear", "constant"):
        raise ValueError(f"decay must be 'linear' or 'constant', got {decay!r}")

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1.0, warm)
        if decay == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1.0, total_steps - warm))

    return factor
