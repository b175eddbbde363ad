"""Heads: from a (peft) transformer and a batch to class logits ``[batch, classes]``."""

from __future__ import annotations

import functools
from typing import Protocol, Sequence

import torch
from pyro.poutine.runtime import am_i_wrapped
from transformers import PreTrainedTokenizerBase

__all__ = ["Head", "AnswerTokenHead", "ChoiceLikelihoodHead", "SequenceClassificationHead", "answer_token_ids"]


class Head(Protocol):
    """Maps a (peft) model and a batch to class logits ``[batch, classes]``.

    A head may also declare ``rows_are_classes = True``: under a gradient its forward runs one row
    per (example, class), example-major, and each class logit depends on its own row alone. Then
    one backward of the logits' sum gives every class's gradient at once (each row's share of it),
    where a head without the attribute needs a backward per class (the GLM predictive uses it)."""

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
    token log-probabilities is the predictive (a uniform prior over choices). Small models can be at
    chance on a lettered multiple-choice prompt and not on its cloze form: answering with a letter
    is a skill they lack, while a continuation's likelihood is what they are trained on.

    Inputs are ``[batch, choices, length]``, right-padded; ``token_type_ids`` marks each row's
    choice tokens with 1 (segment B, the continuation scored) and its context with 0. Only the
    positions predicting a choice token go through the output layer.

    At prediction (no gradient, no Pyro handler) the context the choices of a question share is
    encoded once: its keys and values are cached and repeated for the choices, which then run only
    their own tokens (on HellaSwag's four endings this halves the tokens a pass processes). Under a
    gradient or a handler every row runs whole: K-FAC's hooks and the GLM's Jacobians see one call
    per module, and a handler may give each row its own weights (Flipout's signs), which a shared
    context would not honour."""

    #: under a gradient each choice is its own row, example-major, scored from that row alone
    rows_are_classes = True
    #: positions whose vocabulary logits are formed at once
    chunk = 1024
    #: share the context only when that leaves at most this fraction of a batch's token positions:
    #: the second pass and the cache's copies cost about what a few percent of positions do
    #: (``python -m bench.cloze_context`` measures both ways)
    worth_sharing = 0.9

    def __init__(self, share_context: bool = True) -> None:
        #: encode a question's shared context once at prediction (``False``: always whole rows)
        self.share_context = share_context

    @staticmethod
    def _token_logp(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(states).float()
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)

    @staticmethod
    def _shared_context(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                        ) -> torch.Tensor:
        """``[batch]``: how many leading tokens each question's choices share, all of them context,
        one short of its shortest context so that the position predicting each choice's first token
        stays in the choices' pass. Rows of absent choices (no choice token) take no part; contexts
        cut differently from the left share only their common start."""
        real = (token_type_ids * attention_mask).bool().any(-1)  # [b, k]; the first choice is always real
        context = (attention_mask.bool() & (token_type_ids == 0)).long().sum(-1)  # contexts come first
        shortest = context.masked_fill(~real, input_ids.shape[-1]).min(1).values
        same = ((input_ids == input_ids[:, :1]) | ~real[..., None]).all(1)  # [b, t]
        before_last = torch.arange(input_ids.shape[-1], device=input_ids.device) < shortest[:, None] - 1
        return (same & before_last).long().cumprod(-1).sum(-1)

    @staticmethod
    def context_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, int, int] | None:
        """How prediction splits this ``[batch, choices, length]`` batch: ``(lengths, longest, width)``,
        each question's shared context length (:meth:`_shared_context`), the longest of them and the
        widest choice row after its context; ``None`` when the batch runs whole rows (one choice, or
        sharing would leave more than :attr:`worth_sharing` of its token positions)."""
        _, k, t = input_ids.shape
        if k < 2:
            return None
        lengths = ChoiceLikelihoodHead._shared_context(input_ids, attention_mask, token_type_ids)
        longest, width = torch.stack([lengths.max(), (attention_mask.sum(-1) - lengths[:, None]).max()]).tolist()
        if longest + k * width > ChoiceLikelihoodHead.worth_sharing * k * t:  # (the plan's one host sync)
            return None
        return lengths, longest, width

    @staticmethod
    def _choices_after_context(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               token_type_ids: torch.Tensor, plan: tuple[torch.Tensor, int, int]
                               ) -> tuple[torch.Tensor, ...]:
        """``(hidden, ids, mask, segment)`` of each row from its question's shared context on, that
        context encoded once per question as ``plan`` (:meth:`context_plan`) says.

        The shared contexts are right-aligned in one left-padded pass whose keys and values, repeated
        for the choices, the choices' pass attends to; positions are given explicitly, so each
        token keeps the position it has in its whole row."""
        b, k, t = input_ids.shape
        lengths, longest, width = plan
        arange = functools.partial(torch.arange, device=input_ids.device)
        source = arange(longest) - (longest - lengths[:, None])  # [b, longest]; negative: left padding
        context_mask = (source >= 0).long()
        source = source.clamp(min=0)
        cache = backbone(input_ids=input_ids[:, 0].gather(1, source), attention_mask=context_mask,
                         position_ids=source, use_cache=True).past_key_values
        cache.batch_repeat_interleave(k)
        position = lengths[:, None] + arange(width)  # [b, width]
        inside = (position < t).long()[:, None]
        at = position.clamp(max=t - 1)[:, None].expand(b, k, width)
        ids = input_ids.gather(2, at).reshape(b * k, width)
        mask = (attention_mask.gather(2, at) * inside).reshape(b * k, width)
        segment = (token_type_ids.gather(2, at) * inside).reshape(b * k, width)
        hidden = backbone(input_ids=ids, attention_mask=torch.cat([context_mask.repeat_interleave(k, 0), mask], 1),
                          position_ids=position.repeat_interleave(k, 0), past_key_values=cache,
                          use_cache=True).last_hidden_state
        return hidden, ids, mask, segment

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None or input_ids.dim() != 3:
            raise ValueError("the choice-likelihood head needs [batch, choices, length] inputs with token_type_ids "
                             "marking each choice's tokens (encode a cloze task's examples)")
        b, k, t = input_ids.shape
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, base.base_model_prefix)
        plan = None
        if self.share_context and not torch.is_grad_enabled() and not am_i_wrapped():
            plan = self.context_plan(input_ids, attention_mask, token_type_ids)
        if plan is None:
            ids, mask, segment = (x.reshape(b * k, t) for x in (input_ids, attention_mask, token_type_ids))
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden, ids, mask, segment = self._choices_after_context(backbone, input_ids, attention_mask,
                                                                     token_type_ids, plan)
        # position p predicts token p + 1: keep the positions whose next token is a choice token
        # (one nonzero gives rows and positions for both gathers: the forward's one host sync besides
        # the shared contexts' lengths)
        rows, cols = (segment[:, 1:] * mask[:, 1:]).nonzero(as_tuple=True)
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
