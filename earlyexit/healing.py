"""Token healing: complete a prompt that ends in the middle of a word the way the model tokenizes whole text.

An editor's prompt usually ends inside a word (`self.app`), and the tokenizer splits it
there (`self`, `.`, `app`) where whole text would have one token (`append`). The model
never saw `app` followed by `end` in training, so greedy decoding from there goes astray.
Healing backs off the prompt's end and constrains the first generated token to one whose
text starts with the backed-off text; the completion is reported from the original
prompt's end, so a caller sees only what follows what they typed.

How far to back off: the longest run of final tokens whose text some single token of the
vocabulary starts with (llama.cpp's "dynamic multi" rollback). One token is not always
enough: `    Retu` splits as ` R`, `et`, `u` where whole text has ` Return`, and backing
off `u` alone leaves ` R`, `et`, a split the model never saw either; backing off all
three lets the first token be ` Return`. The run stops at a token no vocabulary entry
could continue with the rest (a newline and indentation before a word, usually), and
always leaves the prompt at least one token.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _vocabulary_strings(tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.decode([i]) for i in range(len(tokenizer)))


def vocabulary_strings(tokenizer) -> tuple[str, ...]:
    """Every token's text, computed once per tokenizer (tokenizers are not hashable everywhere)."""
    try:
        return _vocabulary_strings(tokenizer)
    except TypeError:
        return tuple(tokenizer.decode([i]) for i in range(len(tokenizer)))


@lru_cache(maxsize=8)
def _vocabulary_prefixes(tokenizer) -> frozenset[str]:
    return frozenset(t[:i] for t in vocabulary_strings(tokenizer) for i in range(1, len(t) + 1))


def vocabulary_prefixes(tokenizer) -> frozenset[str]:
    """Every non-empty prefix of every token's text: the texts some single token starts with."""
    try:
        return _vocabulary_prefixes(tokenizer)
    except TypeError:
        return frozenset(t[:i] for t in vocabulary_strings(tokenizer) for i in range(1, len(t) + 1))


def heal(ids: list[int], tokenizer, max_tokens: int | None = None) -> tuple[list[int], str, torch.Tensor | None]:
    """(prompt ids without the backed-off tokens, their text, mask of allowed first tokens (V,)).

    Backs off the longest run of final tokens whose text a vocabulary token starts with,
    at most `max_tokens` of them (None: no limit; 1: the last token only, the healing of
    earlier versions), keeping at least one (see the module's docstring). Prompts of one
    token, or whose last token decodes to nothing printable on its own, are left as they
    are (mask None).
    """
    prefixes = vocabulary_prefixes(tokenizer)
    n, prefix = 0, ""
    while n + 1 < len(ids) and (max_tokens is None or n < max_tokens):
        text = tokenizer.decode(ids[-(n + 1):])
        if not text or "\ufffd" in text or text not in prefixes:  # \ufffd: a partial UTF-8 sequence, no string to match
            break
        n, prefix = n + 1, text
    if n == 0:
        return ids, "", None
    allowed = torch.tensor([s.startswith(prefix) for s in vocabulary_strings(tokenizer)])
    return ids[:-n], prefix, allowed
