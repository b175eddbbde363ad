"""The Pyro model of a LoRA-adapted language model, its sites, heads and loading."""

from .build import LoRAOptions, build_model, default_targets, head_for, lora_options_from_adapter
from .heads import AnswerTokenHead, ChoiceLikelihoodHead, SequenceClassificationHead, answer_token_ids
from .loading import (EMBEDDED_MODELS, ModelNotFoundError, cache_dir, load_causal_lm, load_sequence_classifier,
                      resolve_device, resolve_dtype, resolve_model_path)
from .lora import LoRASite, Site, attach_sites, find_lora_layers, lora_product, site_name
from .model import MASKED_LOGIT, BayesianLoRAModel, lora_dropout_active

__all__ = [
    "AnswerTokenHead", "BayesianLoRAModel", "ChoiceLikelihoodHead", "EMBEDDED_MODELS", "LoRAOptions", "LoRASite", "MASKED_LOGIT",
    "ModelNotFoundError", "SequenceClassificationHead", "Site", "answer_token_ids", "attach_sites", "build_model",
    "cache_dir", "default_targets", "find_lora_layers", "head_for", "load_causal_lm", "load_sequence_classifier",
    "lora_dropout_active", "lora_options_from_adapter", "lora_product", "resolve_device", "resolve_dtype", "resolve_model_path", "site_name",
]
