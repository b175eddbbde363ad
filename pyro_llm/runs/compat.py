"""Run folders written by earlier releases, read by this one: every translation of an old layout
lives here, so the configuration classes describe only the current one."""

from __future__ import annotations

from typing import Any

__all__ = ["upgrade_laplace_dict", "upgrade_run_dict"]

#: Where each key of the flat ``config.json`` of the first releases lives in the nested sections.
_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "device": ("model", "device"), "dtype": ("model", "dtype"),
    "attn_implementation": ("model", "attn_implementation"), "b_site": ("model", "b_site"),
    "train_limit": ("data", "train_limit"), "test_limit": ("data", "test_limit"),
    "max_length": ("data", "max_length"), "split_seed": ("data", "split_seed"),
    "rank": ("lora", "rank"), "alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "targets": ("lora", "target_modules"), "prior": ("prior", "name"), "prior_scale": ("prior", "scale"),
    "guide": ("guide", "name"), "flipout": ("guide", "flipout"), "blob_eps": ("guide", "blob_eps"),
    "sigma_param": ("guide", "sigma_param"), "normal_init_scale": ("guide", "normal_init_scale"),
    "elbo": ("objective", "elbo"), "kl_schedule": ("objective", "kl_schedule"),
    "kl_weight": ("objective", "kl_weight"), "kl_anneal_steps": ("objective", "kl_anneal_steps"),
    "eval_samples": ("eval", "samples"), "eval_batch_size": ("eval", "batch_size"),
    "max_rows": ("eval", "max_rows"), "ece_bins": ("eval", "ece_bins")}

#: The K-FAC keys that Laplace runs of the first releases kept at the top of their section.
_FLAT_KFAC = {"fisher": "fisher", "kfac_mode": "mode", "n_kfac": "n_kfac", "dense_threshold": "dense_threshold",
              "batch_size": "batch_size"}


def upgrade_run_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A run section in the current nested layout (the flat layout of the first releases, which
    names its guide at the top level, is translated key by key)."""
    if not isinstance(data.get("guide"), str):
        return data
    nested: dict[str, Any] = {}
    for key, value in data.items():
        section, name = _FLAT_KEYS.get(key, (key, ""))
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return nested


def upgrade_laplace_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A Laplace section with its K-FAC settings nested under ``kfac``."""
    data = dict(data)
    flat = {new: data.pop(old) for old, new in _FLAT_KFAC.items() if old in data}
    if flat:
        data["kfac"] = {**data.get("kfac", {}), **flat}
    return data
