"""Tokenising examples into fixed tensors and serving deterministic minibatches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .examples import Example

__all__ = ["EncodedDataset", "encode_examples", "in_row_order"]


@dataclass
class EncodedDataset:
    """Padded token tensors of a whole split (right padding) plus labels and choice masks.

    ``choice_mask[i, c]`` is True for the answer classes example ``i`` actually has. Cloze tasks
    hold a row per choice: tokens ``[examples, choices, length]``, with ``token_type_ids`` 1 on
    each row's choice tokens (see :func:`encode_examples`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    choice_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # row lengths as Python ints, once: trimming a batch then reads no tensor (no host sync)
        lengths = self.attention_mask.sum(-1)
        self._lengths: list[int] = (lengths.amax(-1) if lengths.dim() > 1 else lengths).tolist()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for the rows ``index`` (trimmed to their longest row)."""
        mask = self.attention_mask[index]
        width = max((self._lengths[i] for i in index.tolist()), default=0)
        # the length is the attention mask's last dimension (after the choices of a cloze batch)
        trim = (index, *[slice(None)] * (self.attention_mask.dim() - 2), slice(0, width))
        out = {
            "input_ids": self.input_ids[trim],
            "attention_mask": mask[..., :width],
            "labels": self.labels[index],
            "choice_mask": self.choice_mask[index],
            "index": index,
        }
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[trim]
        return {k: v.to(device) if device is not None else v for k, v in out.items()}

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """A permutation that depends only on ``(seed, epoch)``: resumable data order."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(len(self), generator=gen)

    def training_batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Row indices of training step ``step`` (epochs reshuffled, the last partial batch dropped)."""
        per_epoch = max(len(self) // batch_size, 1)
        epoch, pos = divmod(step, per_epoch)
        order = self.epoch_order(seed, epoch)
        return order[pos * batch_size:(pos + 1) * batch_size]

    def sequential(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Row indices in order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield torch.arange(start, min(start + batch_size, len(self)))

    @property
    def sequences_per_row(self) -> int:
        """Sequences the model reads per row: one per choice for a cloze task, else one."""
        return int(self.input_ids.shape[1]) if self.input_ids.dim() == 3 else 1

    def by_length(self, batch_size: int, max_tokens: int | None = None) -> list[torch.Tensor]:
        """Row indices in batches of neighbouring lengths, longest first, for evaluation passes.

        A batch is trimmed to its longest row, so grouping rows by length cuts the padding a pass
        computes (a BoolQ passage is 40 to 400 tokens); the longest batch comes first, so a pass that
        would run out of memory does so at once. ``max_tokens`` also bounds a batch's padded tokens
        (rows x :attr:`sequences_per_row` x its longest row), for a pass whose memory grows with
        them, such as one under a gradient; a row over the bound on its own is a batch of one.
        Per-row results go back to row order with :func:`in_row_order`."""
        order = sorted(range(len(self)), key=lambda i: -self._lengths[i])  # stable: ties keep row order
        per_row = self.sequences_per_row
        batches: list[list[int]] = []
        for i in order:  # longest first: a batch's width is its first row's
            last = batches[-1] if batches else None
            if last is not None and len(last) < batch_size and (
                    max_tokens is None or (len(last) + 1) * per_row * self._lengths[last[0]] <= max_tokens):
                last.append(i)
            else:
                batches.append([i])
        return [torch.tensor(b) for b in batches]


def in_row_order(batches: Sequence[torch.Tensor], parts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Per-batch results ``parts`` (rows along ``dim``) of the row-index ``batches`` put back in row order."""
    index = torch.cat(list(batches))
    stacked = torch.cat(list(parts), dim=dim)
    out = torch.empty_like(stacked)
    out.index_copy_(dim, index.to(stacked.device), stacked)
    return out


def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    num_classes: int,
    max_length: int = 256,
) -> EncodedDataset:
    """Tokenise ``examples``; causal prompts are left-truncated by the tokenizer's setting so
    they keep their final ``Answer:``."""
    if not examples:
        raise ValueError("no examples to encode")
    if any(e.choices for e in examples):
        return _encode_cloze(examples, tokenizer, num_classes, max_length)
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    kwargs = dict(padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    if any(p is not None for p in pairs):
        enc = tokenizer(texts, [p or "" for p in pairs], **kwargs)
    else:
        enc = tokenizer(texts, **kwargs)
    return EncodedDataset(enc["input_ids"], enc["attention_mask"], *_labels(examples, num_classes),
                          enc.get("token_type_ids"))


def _labels(examples: Sequence[Example], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, choice_mask)``: each example's answer, and which of the task's classes it has."""
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    choices = torch.tensor([e.num_choices for e in examples])
    return labels, torch.arange(num_classes)[None, :] < choices[:, None]


def _encode_cloze(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, num_classes: int,
                  max_length: int) -> EncodedDataset:
    """A row per choice: the context's tokens (cut from the left to fit ``max_length``) then the
    choice's, which ``token_type_ids`` marks with 1; rows of absent choices are one context token."""
    if not all(e.choices for e in examples):
        raise ValueError("cloze examples (with choices) cannot be encoded with examples without them")
    if any(len(e.choices) > num_classes for e in examples):
        raise ValueError(f"an example has more than the task's {num_classes} choices")
    contexts = tokenizer([e.text for e in examples])["input_ids"]
    rows: list[list[tuple[list[int], int]]] = []
    for ex, ctx in zip(examples, contexts):
        chosen = tokenizer(list(ex.choices), add_special_tokens=False)["input_ids"]
        per_choice = []
        for cont in chosen:
            cont = cont[:max_length - 1]
            keep = ctx[max(0, len(ctx) + len(cont) - max_length):]
            per_choice.append((keep + cont, len(keep)))
        per_choice += [(ctx[:1], 1)] * (num_classes - len(per_choice))
        rows.append(per_choice)
    width = max(len(ids) for r in rows for ids, _ in r)
    shape = (len(examples), num_classes, width)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full(shape, pad, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    segment = torch.zeros(shape, dtype=torch.long)
    for i, r in enumerate(rows):
        for c, (ids, start) in enumerate(r):
            input_ids[i, c, :len(ids)] = torch.tensor(ids)
            attention[i, c, :len(ids)] = 1
            segment[i, c, start:len(ids)] = 1
    return EncodedDataset(input_ids, attention, *_labels(examples, num_classes), segment)
