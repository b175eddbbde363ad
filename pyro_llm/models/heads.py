"""Heads: from a (peft) transformer and a batch to class logits ``[batch, classes]``."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["Head", "AnswerTokenHead", "ChoiceLikelihoodHead", "SequenceClassificationHead", "answer_token_ids"]


class Head(Protocol):
    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor: ...


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> list[int]:
    """The token id of each answer string (``" A"``...), which must be a single token."""
    ids = []
    for ans in answers:
        toks = tokenizer(ans, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"answer {ans!r} is {len(toks)} tokens for this tokenizer; it must be exactly one")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {list(answers)} map to repeated token ids {ids}")
    return ids


class AnswerTokenHead:
    """Next-token logits of the answer-label tokens at each row's last real position.

    Only the last position goes through the output layer (``lm_head``, LoRA-adapted or not), so
    no ``[batch, length, vocab]`` tensor is formed. Rows must be right-padded.
    """

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.long().sum(1) - 1
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = base.get_output_embeddings()(h_last)
        return logits[:, self.token_ids.to(logits.device)]


class ChoiceLikelihoodHead:
    """Each choice's log-likelihood as its class logit: ``log p(choice tokens | context)``.

    The cloze formulation of multiple choice (how small models are scored in lm-eval and OLMES): a
    row per choice, context then the choice's tokens, and the softmax over the choices' summed
    token log-probabilities is the predictive (a uniform prior over choices). A 135M model is at
    chance on lettered PIQA but not on its cloze form, because the letters are a skill small
    models lack while the continuations' likelihood is what they are trained on.

    Inputs are ``[batch, choices, length]``, right-padded; ``token_type_ids`` marks each row's
    choice tokens with 1 (segment B, the continuation scored) and its context with 0. Only the
    positions predicting a choice token go through the output layer."""

    #: positions whose vocabulary logits are formed at once
    chunk = 1024

    @staticmethod
    def _token_logp(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(states).float()
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None or input_ids.dim() != 3:
            raise ValueError("the choice-likelihood head needs [batch, choices, length] inputs with token_type_ids "
                             "marking each choice's tokens (encode a cloze task's examples)")
        b, k, t = input_ids.shape
        ids, mask = input_ids.reshape(b * k, t), attention_mask.reshape(b * k, t)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        # position p predicts token p + 1: keep the positions whose next token is a choice token
        # (one nonzero, the forward's one host sync, gives rows and positions for both gathers)
        rows, cols = (token_type_ids.reshape(b * k, t)[:, 1:] * mask[:, 1:]).nonzero(as_tuple=True)
        states, targets = hidden[rows, cols], ids[rows, cols + 1]
        head = base.get_output_embeddings()
        # vocabulary logits a chunk of positions at a time: at prediction (no graph kept) memory is
        # one chunk's, not every choice token's of a stacked N-sample batch
        token_lp = torch.cat([self._token_logp(head, states[i:i + self.chunk], targets[i:i + self.chunk])
                              for i in range(0, max(states.shape[0], 1), self.chunk)])
        sums = torch.zeros(b * k, dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
        return sums.reshape(b, k)


class SequenceClassificationHead:
    """The classifier logits of an ``AutoModelForSequenceClassification``."""

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
