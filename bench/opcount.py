"""Counting what reaches the device: aten ops (about one CUDA kernel launch each), host syncs and
bytes written, on the CPU, so the GPU cost of a change is visible without a GPU.

A :class:`OpCounter` is a ``TorchDispatchMode``: every aten call inside it is counted by name; ops
that only make views (no kernel on a GPU) are kept apart; ``_local_scalar_dense`` is a host sync
(``.item()``, ``float(t)``, ``bool(t)``); the bytes of every non-view output are what the ops write.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LINALG", "OpCounter", "VIEWS", "count"]

#: Ops that only make views or aliases: no kernel launch on a GPU.
VIEWS = frozenset({
    "view", "_unsafe_view", "slice", "as_strided", "expand", "detach", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "alias", "select", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias", "chunk",
    "narrow", "view_as_real", "view_as_complex", "lift_fresh", "unfold", "diagonal", "expand_as", "indices",
    "values"})

#: Dense linear algebra (factorisations), which a training step or a K-FAC pass should not run per batch.
LINALG = frozenset({"_linalg_svd", "_linalg_eigh", "linalg_qr", "geqrf", "_linalg_eigvals", "linalg_eig",
                    "_linalg_solve_ex", "linalg_cholesky_ex", "linalg_inv_ex"})


class OpCounter(TorchDispatchMode):
    """Counts every aten op run inside it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.bytes_written = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        if name not in VIEWS:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes_written += t.numel() * t.element_size()
        return out

    @property
    def kernels(self) -> int:
        """Ops that launch a kernel (views left out)."""
        return sum(v for k, v in self.ops.items() if k not in VIEWS)

    @property
    def host_syncs(self) -> int:
        return self.ops.get("_local_scalar_dense", 0)

    @property
    def linalg(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in LINALG}

    def summary(self) -> dict[str, Any]:
        return {"kernel_ops": self.kernels, "host_syncs": self.host_syncs, "bytes_written": self.bytes_written,
                "linalg": self.linalg}


def count(fn: Callable[[], Any], warmup: int = 2) -> OpCounter:
    """The ops of one call of ``fn`` after ``warmup`` uncounted calls (first-call set-up left out)."""
    for _ in range(warmup):
        fn()
    counter = OpCounter()
    with counter:
        fn()
    return counter
