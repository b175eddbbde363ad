"""Temperature scaling (Guo et al. 2017): the post-hoc baseline every calibration method must beat.

A single ``T > 0`` minimises the NLL of ``softmax(logits / T)`` on held-out data (validation split);
accuracy is unchanged. Masked answer classes stay at probability zero.

For a predictive *distribution* (BLoB's N-sample average, a Laplace predictive, an ensemble) the
same recipe applies to its log-probabilities, ``p_T ∝ p^(1/T)`` (:func:`fit_temperature_to_probs`,
:func:`temper`); for a single network's softmax it is exactly temperature scaling of the logits.
"""

from __future__ import annotations

import torch

__all__ = ["apply_temperature", "fit_temperature", "fit_temperature_to_probs", "temper"]

#: The log-probability given to a class of probability zero (a masked answer): far enough below any
#: real one that no fitted temperature (kept at most 100) lifts it to a visible probability.
_LOG_ZERO = -1e6


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The NLL-optimal temperature on ``(logits, labels)`` (LBFGS on ``log T``)."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1).float()


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.double().clamp_min(0).log().clamp_min(_LOG_ZERO)


def fit_temperature_to_probs(probs: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The NLL-optimal ``T`` for ``p^(1/T)`` (renormalised) on a predictive distribution's
    probabilities ``probs`` ``[N, C]``, e.g. on a validation split; kept within ``[0.01, 100]``
    (labels the predictive cannot tell apart send the optimum to infinity: the uniform answer)."""
    return min(max(fit_temperature(_log_probs(probs), labels, steps), 1e-2), 1e2)


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T)``, renormalised: temperature scaling of a predictive distribution."""
    return apply_temperature(_log_probs(probs), temperature)
