"""Run folders written by earlier releases, read by this one: every translation of an old layout
lives here, so the configuration classes describe only the current one."""

from __future__ import annotations

from typing import Any

__all__ = ["run_section", "upgrade_laplace_dict", "upgrade_run_dict"]

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


def run_section(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``run`` section of a ``config.json``, with the Laplace section that releases before the
    per-kind configurations kept beside it moved inside."""
    run = raw["run"]
    if raw.get("kind") == "laplace" and isinstance(raw.get("laplace"), dict) and "laplace" not in run:
        run = {**run, "laplace": raw["laplace"]}
    return run


def upgrade_run_dict(data: dict[str, Any], kind: str, known: set[str]) -> dict[str, Any]:
    """A run section in the current layout of its ``kind``, whose configuration has the top-level
    fields ``known``: the flat layout of the first releases (which names its guide at the top level)
    is nested key by key; ``B``'s role moves from the model section to the SVI run's top level (a
    Laplace run's extent is its ``laplace.a_only``); a Laplace run takes its seed from the optimiser
    section it recorded; sections a kind does not have (recorded when one configuration served
    every kind) are dropped."""
    flat = isinstance(data.get("guide"), str)
    if flat:
        nested: dict[str, Any] = {}
        for key, value in data.items():
            section, name = _FLAT_KEYS.get(key, (key, ""))
            if name:
                nested.setdefault(section, {})[name] = value
            else:
                nested[key] = value
        data = nested
    model = data.get("model")
    if not flat and not (isinstance(model, dict) and "b_site" in model):
        return data  # the current layout (b_site left the model section with the per-kind configurations)
    if isinstance(model, dict) and "b_site" in model:
        data = {**data, "model": {k: v for k, v in model.items() if k != "b_site"}}
        if kind == "svi":
            data["b_site"] = model["b_site"]
    if "seed" in known and "seed" not in data and isinstance(data.get("optim"), dict):
        data["seed"] = data["optim"].get("seed", 0)
    return {k: v for k, v in data.items() if k in known}


def upgrade_laplace_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A Laplace section with its K-FAC settings nested under ``kfac``."""
    data = dict(data)
    flat = {new: data.pop(old) for old, new in _FLAT_KFAC.items() if old in data}
    if flat:
        data["kfac"] = {**data.get("kfac", {}), **flat}
    return data
