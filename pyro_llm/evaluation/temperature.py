"""Temperature scaling (Guo et al. 2017): the post-hoc baseline every calibration method must beat.

A single ``T > 0`` minimises the NLL of ``softmax(logits / T)`` on held-out data (validation split);
accuracy is unchanged. Masked answer classes stay at probability zero.
"""

from __future__ import annotations

import torch

__all__ = ["fit_temperature", "apply_temperature"]


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
