"""Byte-level BPE for Python source, trained with `tokenizers`, loadable by `AutoTokenizer`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

EOS = "<|endoftext|>"


def seeded_sample(items: Sequence, budget: int, seed: int, size: Callable = len) -> Iterator:
    """`items` in a seeded shuffled order until their `size`s reach `budget` (the item that crosses it included)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    for i in order:
        if budget <= 0:
            return
        budget -= size(items[i])
        yield items[i]


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path, max_bytes: int | None = 60_000_000, seed: int = 0):
    """Train a byte-level BPE on (a seeded sample of at most `max_bytes` of; None: all) `texts`.

    Byte-level means every string round-trips: no unknown tokens, whatever the file holds.
    Saved as a `PreTrainedTokenizerFast` with `<|endoftext|>` as BOS/EOS/UNK, as GPT-2 does.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(seeded_sample(texts, float("inf") if max_bytes is None else max_bytes, seed), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tok.model_max_length = 1_000_000  # the model's context, not the tokenizer, bounds prompts
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
