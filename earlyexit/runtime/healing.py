"""Token healing: complete a prompt that ends in the middle of a word the way the model tokenizes whole text.

An editor's prompt usually ends inside a word (`self.app`), and the tokenizer splits it
there (`self`, `.`, `app`) where whole text would have one token (`append`). The model
never saw `app` followed by `end` in training, so greedy decoding from there goes astray.
Healing backs off the prompt's end and constrains the generated tokens to rewrite the
backed-off text: the next token must start with all of what is left of it, or be a part of
its start that leaves only whitespace, until it is written. The second kind is for
whitespace, which the tokenizer splits by what follows it: a prompt ending in a blank
indented line, `\n    `, is one token there, where the line's text would be `\n   ` then
` def`. A word is never split so (` R` then `et` would be the prompt's own bad split of
` Retu`, where whole text has ` Return`), so its text must come in one token. The
completion is reported from the original prompt's end, so a caller sees only what follows
what they typed.

How far to back off: the longest run of final tokens whose text the constraint can write
(llama.cpp's "dynamic multi" rollback, extended to whitespace). One token is not always
enough: `    Retu` splits as ` R`, `et`, `u` where whole text has ` Return`, and backing
off `u` alone leaves ` R`, `et`, a split the model never saw either; backing off all
three lets the first token be ` Return`. Likewise `x = 1\n\n    ` ends `\n`, `\n    `
where whole text has `\n\n   ` then ` def`. The run stops at a token no vocabulary entry
could continue with the rest (a newline and indentation before a word, usually), and
always leaves the prompt at least one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's token texts, as healing asks about them."""

    strings: tuple[str, ...]  # by token id
    tokens: frozenset[str]
    prefixes: frozenset[str]  # every non-empty prefix of every token's text: the texts some single token starts with
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # allowed()'s masks by (pending, whitespace_splits)

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        strings = tuple(tokenizer.decode([i]) for i in range(len(tokenizer)))
        return cls(strings, frozenset(strings), frozenset(t[:i] for t in strings for i in range(1, len(t) + 1)))

    def writable(self, text: str) -> bool:
        """Whether `allowed` lets some token start writing `text`: one starts with all of it, or one is all of it
        but trailing whitespace."""
        return text in self.prefixes or any(text[:i] in self.tokens for i in range(max(1, len(text.rstrip())), len(text)))

    def allowed(self, pending: str, whitespace_splits: bool = True) -> torch.Tensor:
        """Mask (V,) of the tokens that may come next while `pending` backed-off text is still to be written: those
        that start with all of it, and (`whitespace_splits`) those that are a non-empty part of its start leaving
        only whitespace. Each mask is computed once (a pass in Python over every token's text) and
        kept: a healed prompt asks again at every constrained step, and a batch of prompts often asks the same."""
        key = (pending, whitespace_splits)
        if key not in self._masks:
            if len(self._masks) >= 1024:
                self._masks.clear()
            self._masks[key] = torch.tensor([bool(t) and (t.startswith(pending) or (whitespace_splits and pending.startswith(t)
                                                                                     and pending[len(t):].isspace()))
                                             for t in self.strings])
        return self._masks[key].clone()  # the caller's to change


@lru_cache(maxsize=8)
def _vocabulary(tokenizer) -> Vocabulary:
    return Vocabulary.of(tokenizer)


def vocabulary(tokenizer) -> Vocabulary:
    """The tokenizer's `Vocabulary`, computed once per tokenizer (tokenizers are not hashable everywhere)."""
    try:
        return _vocabulary(tokenizer)
    except TypeError:
        return Vocabulary.of(tokenizer)


def vocabulary_strings(tokenizer) -> tuple[str, ...]:
    """Every token's text, by token id."""
    return vocabulary(tokenizer).strings


HEALING_MODES = ("word", "token")


def heal(ids: list[int], tokenizer, mode: str = "word") -> tuple[list[int], str]:
    """(prompt ids without the backed-off tokens, their text); `allowed_tokens` says what may write it.

    `word`: backs off the longest run of final tokens whose text the constraint can write
    (`Vocabulary.writable`), keeping at least one (see the module's docstring). `token`: the
    healing of earlier versions, kept to score against results made with it: the last token
    only, which the first new token must extend. Prompts of one token, or whose last token
    decodes to nothing printable on its own, are left as they are (text "").
    """
    vocab = vocabulary(tokenizer)
    n, prefix = 0, ""
    while n + 1 < len(ids) and (mode == "word" or n < 1):
        text = tokenizer.decode(ids[-(n + 1):])
        if not text or "\ufffd" in text or not vocab.writable(text):  # \ufffd: a partial UTF-8 sequence, no string to match
            break
        n, prefix = n + 1, text
    return (ids[:-n], prefix) if n else (ids, "")


def allowed_tokens(pending: str, tokenizer, mode: str = "word") -> torch.Tensor:
    """`Vocabulary.allowed` of the tokenizer's vocabulary, for healing `mode` (in `token` mode every allowed token
    writes all of `pending`)."""
    return vocabulary(tokenizer).allowed(pending, whitespace_splits=mode == "word")


def still_pending(pending: str, token_text: str) -> str:
    """What is left of the backed-off text once a token allowed by `allowed_tokens` is written."""
    return pending[len(token_text):] if len(token_text) < len(pending) and pending.startswith(token_text) else ""
