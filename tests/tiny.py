"""Tiny real transformers models and tokenizers built locally (no downloads) for fast tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, \
    PreTrainedTokenizerFast

from pyro_llm.data import LETTERS, load_examples

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    words: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    pre = pre_tokenizers.Whitespace()
    for w in list(LETTERS) + [t for text in texts for t, _ in pre.pre_tokenize_str(text)]:
        words.setdefault(w, len(words))
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def corpus(task: str = "arc-easy", n: int = 64) -> list[str]:
    return [e.text + " " + (e.text_pair or "") for s in ("train", "test", "validation")
            for e in load_examples(task, s, limit=n)]


def save_tiny_llama(path: Path, task: str = "arc-easy", hidden: int = 32, layers: int = 2, seed: int = 0,
                    tie: bool = False) -> Path:
    tok = word_tokenizer(corpus(task))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_bert(path: Path, task: str = "sst2", hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    tok = word_tokenizer(corpus(task))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
