"""A quantized base model: bitsandbytes' 8-bit (LLM.int8) and 4-bit NF4 linear layers under the
LoRA adapter, the way Hugging Face and peft load one (a ``BitsAndBytesConfig`` at load, then
``prepare_model_for_kbit_training``). Only the frozen base weights are quantized: LoRA matrices,
guide parameters and a classifier's new head stay float32, so priors, guides, Flipout, K-FAC and
the GLM see the same LoRA sites as on a float base."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

__all__ = ["QUANTIZE_KINDS", "check_quantize", "quantization_config", "quantized_linear_bytes", "stored_bytes"]

#: ``--quantize`` choices: LLM.int8 (8-bit rows with fp16 outliers) and 4-bit NormalFloat
QUANTIZE_KINDS = ("int8", "nf4")


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs at every 8-bit product that float32 inputs are cast to float16, which is how
    LLM.int8 works: the notice is dropped, nothing else from its logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


_CAST_NOTICE = _DropCastNotice()


def check_quantize(kind: str | None, device: torch.device) -> None:
    """A clear error where ``kind`` cannot run: an unknown kind, bitsandbytes not installed, or a
    device bitsandbytes has no kernels for (it runs on CUDA and, since 0.50, on the CPU)."""
    if kind is None:
        return
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_KINDS)} (or none), got {kind!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"--quantize {kind} needs bitsandbytes: pip install 'bitsandbytes>=0.50'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantize {kind} runs on cuda or cpu (bitsandbytes' kernels), not on {device.type}")


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``kind``; 4-bit layers compute in ``compute_dtype``
    (the run's dtype)."""
    from transformers import BitsAndBytesConfig

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_NOTICE)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False)


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quant_state_bytes(state: Any) -> int:
    if state is None:
        return 0
    total = sum(_tensor_bytes(getattr(state, k, None)) for k in ("absmax", "code", "offset"))
    return total + _quant_state_bytes(getattr(state, "state2", None))


def quantized_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, float32 bytes)`` of the model's quantized linear layers: their parameters and buffers
    as stored, quantization constants included (NF4's per-block ``absmax`` and code book, int8's
    per-row scales), against the same layers' weights and biases in float32."""
    import bitsandbytes as bnb

    stored = as_float = 0
    for module in model.modules():
        if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        w = module.weight
        stored += _tensor_bytes(w) + sum(_tensor_bytes(b) for b in module.buffers(recurse=False))
        stored += _quant_state_bytes(getattr(w, "quant_state", None))
        stored += _tensor_bytes(getattr(w, "SCB", None))
        stored += _tensor_bytes(module.bias) if module.bias is not None else 0
        as_float += 4 * (module.in_features * module.out_features + (module.out_features if module.bias is not None
                                                                     else 0))
    return stored, as_float


def stored_bytes(model: nn.Module) -> int:
    """Bytes the whole model holds: every parameter and buffer as stored, with the quantization
    constants bitsandbytes keeps beside its weights (NF4's ``quant_state``, int8's ``SCB``)."""
    total = sum(_tensor_bytes(p) for p in model.parameters()) + sum(_tensor_bytes(b) for b in model.buffers())
    for p in model.parameters():
        total += _quant_state_bytes(getattr(p, "quant_state", None)) + _tensor_bytes(getattr(p, "SCB", None))
    return total
