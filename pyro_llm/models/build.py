"""From names to a ready :class:`BayesianLoRAModel`: load, inject LoRA, pick the head."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from ..checks import check_int, check_real
from ..options import option
from ..data.prompts import answer_strings
from ..data.tasks import CLASSIFICATION, CLOZE, TaskSpec
from ..io import CorruptFileError, read_json
from ..priors import PriorLike
from .heads import AnswerTokenHead, ChoiceLikelihoodHead, Head, SequenceClassificationHead, answer_token_ids
from .loading import load_causal_lm, load_sequence_classifier
from .model import BayesianLoRAModel

__all__ = ["LoRAOptions", "build_model", "default_targets", "head_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAOptions:
    """LoRA hyper-parameters (BLoB's reference: r 8, alpha 16, dropout 0, q/v projections)."""

    rank: int = option(8, "LoRA rank r.")
    alpha: float = option(16.0, "LoRA scaling alpha (the update is alpha / r * B A).")
    dropout: float = option(0.0, "Dropout on the LoRA input (with the MAP guide: MC dropout at evaluation).",
                            flag="--lora-dropout")
    target_modules: tuple[str, ...] | None = option(
        None, "Comma-separated LoRA target modules (default: the model's query and value projections).",
        flag="--targets", parse=lambda text: tuple(t for t in text.split(",")))
    #: LoRA on the output layer as well (the BLoB reference's ``--apply-classhead-lora``): a causal
    #: LM's ``lm_head`` (tied to the input embeddings or not: the adapter never changes the shared
    #: weight); a classifier's new head is trained in full already and is left as it is
    class_head: bool = option(False, "LoRA on the output layer too (lm_head; the BLoB reference's "
                                     "--apply-classhead-lora).")

    def __post_init__(self) -> None:
        if not isinstance(self.class_head, bool):
            raise ValueError(f"class_head must be true or false, got {self.class_head!r}")
        check_int("rank", self.rank, low=1)
        check_real("alpha", self.alpha, low=0, low_open=True)
        check_real("lora_dropout", self.dropout, low=0, high=0.99)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not hasattr(self.target_modules, "__iter__"):
                raise ValueError(f"targets must be a list of module names, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"targets must be non-empty module names, got {self.target_modules!r}")


#: The attention query/value projections under their names in common architectures (BLoB and
#: Laplace-LoRA adapt these two): Llama/Mistral/Qwen/OPT, BERT/RoBERTa/MiniLM, GPT-2, T5/Falcon.
_QV_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("q", "v"))


def default_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The query/value projection names that ``model`` has (first match of ``_QV_NAMES``)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in _QV_NAMES:
        if all(n in leaves for n in names):
            return names
    raise ValueError(f"{type(model).__name__}: no query/value projections found under the names "
                     f"{list(_QV_NAMES)}; pass the LoRA target modules explicitly")


def output_layer_names(model: torch.nn.Module) -> list[str]:
    """The module path of ``model``'s output layer (``lm_head``), as a LoRA target: matched by
    identity with ``get_output_embeddings()``, not by name."""
    out = model.get_output_embeddings()
    return [name for name, module in model.named_modules() if module is out and name][:1]


def head_for(task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> Head:
    """The head that reads ``task``'s class logits: a classifier's own logits, each choice's
    likelihood (cloze tasks), or the answer letters' next-token logits (lettered multiple choice)."""
    if task.kind == CLASSIFICATION:
        return SequenceClassificationHead()
    if task.kind == CLOZE:
        return ChoiceLikelihoodHead()
    return AnswerTokenHead(answer_token_ids(tokenizer, answer_strings(task.num_classes)))


def build_model(
    model_name: str,
    task: TaskSpec,
    *,
    lora: LoRAOptions = LoRAOptions(),
    prior: PriorLike = None,
    b_site: bool = False,
    dataset_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    cache: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantize: str | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[BayesianLoRAModel, PreTrainedTokenizerBase]:
    """Load ``model_name``, add LoRA (fresh, seeded, or from a peft ``adapter_dir``) and wrap it.

    Multiple-choice and cloze tasks take a causal LM (heads: :func:`head_for`); classification tasks
    an encoder with a new classification head (kept trainable through peft's ``modules_to_save``).
    ``quantize`` (``"int8"``, ``"nf4"``) quantizes the base model's linear layers (:mod:`.quantize`);
    ``gradient_checkpointing`` recomputes the layers' activations in the backward pass
    (:meth:`BayesianLoRAModel.enable_gradient_checkpointing`).
    """
    if task.kind == CLASSIFICATION:
        base, tok = load_sequence_classifier(model_name, task.num_classes, device=device, dtype=dtype, cache=cache,
                                             trust_remote_code=trust_remote_code, seed=seed,
                                             attn_implementation=attn_implementation, quantize=quantize)
        task_type = TaskType.SEQ_CLS
    else:
        base, tok = load_causal_lm(model_name, device=device, dtype=dtype, cache=cache,
                                   trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                                   quantize=quantize)
        task_type = TaskType.CAUSAL_LM
    head = head_for(task, tok)
    if adapter_dir is not None:
        with _quiet_peft():
            peft_model = _load_adapter(base, model_name, Path(adapter_dir))
    else:
        targets = list(lora.target_modules or default_targets(base))
        if lora.class_head and task_type == TaskType.CAUSAL_LM:
            targets += [name for name in output_layer_names(base) if name not in targets]
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                            target_modules=targets)
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(seed)
            peft_model = get_peft_model(base, config)
    peft_model.to(torch.device(device) if not isinstance(device, torch.device) else device)
    peft_model.eval()  # dropout off: randomness comes from the guide
    model = BayesianLoRAModel(peft_model, head, prior, b_site=b_site, dataset_size=dataset_size)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, tok


@contextlib.contextmanager
def _quiet_peft():
    """peft's wrapping asks transformers ``is_gradient_checkpointing``, which transformers 5 marks
    deprecated: a FutureWarning on every model built that no user can act on, so it is hidden
    (only that one). So is peft's warning about LoRA on a tied ``lm_head``: it concerns merging the
    adapter into the shared weight, which pyro-llm never does (the adapter stays a separate product,
    and the input embeddings are unchanged; tests/models/test_class_head.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*")
        yield


def _load_adapter(base: torch.nn.Module, model_name: str, adapter_dir: Path) -> PeftModel:
    """A peft adapter on ``base``; an adapter made for another base is refused in one sentence (peft
    says it in a page of size mismatches), and one whose recorded base has another name is loaded
    with a warning (same shapes, possibly other weights)."""
    recorded = str(adapter_config(adapter_dir).base_model_name_or_path or "")
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except (SafetensorError, OSError) as err:
        raise CorruptFileError(f"the adapter weights in {adapter_dir} cannot be read ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise ValueError(f"adapter {adapter_dir} was made for another base model ({recorded or 'unnamed'}), not "
                         f"{model_name}: its shapes differ ({first[:200]})") from None
    if recorded and Path(recorded).name != Path(model_name).name and recorded != model_name:
        log.warning("adapter %s records the base model %s; loading it on %s (the shapes match)", adapter_dir,
                    recorded, model_name)
    return peft_model


def adapter_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    """A peft adapter folder's ``LoraConfig``, its file checked first: a file that is not JSON or
    whose rank, alpha or targets have the wrong type is an error naming the file."""
    path = Path(adapter_dir) / "adapter_config.json"
    raw = read_json(path, "adapter configuration")
    problems = []
    if not isinstance(raw, dict):
        problems.append("it is not a JSON object")
    else:
        if "r" in raw and (isinstance(raw["r"], bool) or not isinstance(raw["r"], int) or raw["r"] < 1):
            problems.append(f"r must be a positive integer, got {raw['r']!r}")
        if "lora_alpha" in raw and (isinstance(raw["lora_alpha"], bool) or
                                    not isinstance(raw["lora_alpha"], (int, float))):
            problems.append(f"lora_alpha must be a number, got {raw['lora_alpha']!r}")
        targets = raw.get("target_modules")
        if targets is not None and not (isinstance(targets, str) or
                                        isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            problems.append(f"target_modules must be a name or a list of names, got {targets!r}")
    if problems:
        raise CorruptFileError(f"adapter configuration {path}: {'; '.join(problems)}")
    try:
        return LoraConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError, OSError) as err:
        raise CorruptFileError(f"adapter configuration {path} is not a LoRA configuration peft accepts: {err}") \
            from err


def lora_options_from_adapter(adapter_dir: str | os.PathLike) -> LoRAOptions:
    cfg = adapter_config(adapter_dir)
    targets: Sequence[str] = sorted(cfg.target_modules) if cfg.target_modules else ()
    return LoRAOptions(rank=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=tuple(targets))


__all__ += ["adapter_config", "lora_options_from_adapter"]
