"""Token healing: complete a prompt that ends in the middle of a token the way the model tokenizes whole text.

An editor's prompt usually ends inside a word (`self.app`), and the tokenizer splits it
there (`self`, `.`, `app`) where whole text would have one token (`append`). The model
never saw `app` followed by `end` in training, so greedy decoding from there goes astray.
Healing backs off the prompt's last token and constrains the first generated token to one
whose text starts with the backed-off text; the completion is reported from the original
prompt's end, so a caller sees only what follows what they typed.
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


def heal(ids: list[int], tokenizer) -> tuple[list[int], str, torch.Tensor | None]:
    """(prompt ids without the last token, that token's text, mask of allowed first tokens (V,)).

    Prompts of one token, or whose last token decodes to nothing printable on its own, are
    left as they are (mask None).
    """
    if len(ids) < 2:
        return ids, "", None
    prefix = tokenizer.decode([ids[-1]])
    if not prefix or "\ufffd" in prefix:  # a partial UTF-8 sequence: no string prefix to match
        return ids, "", None
    allowed = torch.tensor([s.startswith(prefix) for s in vocabulary_strings(tokenizer)])
    return ids[:-1], prefix, allowed
