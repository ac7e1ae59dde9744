"""Completion quality metrics: exact match, edit similarity, ROUGE-L, degenerate repetition."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after trailing whitespace is dropped (an editor does not show it)."""
    return prediction.rstrip() == reference.rstrip()


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / longer length, in [0, 1] (1.0 for two empty strings)."""
    p, r = prediction.rstrip(), reference.rstrip()
    longest = max(len(p), len(r))
    return 1.0 if longest == 0 else 1.0 - levenshtein(p, r) / longest


def longest_common_subsequence(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if ca == cb else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def indel_similarity(prediction: str, reference: str) -> float:
    """2 * LCS / total length, in [0, 1] (1.0 for two empty strings): the edit similarity of CodeXGLUE's line
    completion evaluator (fuzzywuzzy's `fuzz.ratio` over python-Levenshtein, an insert/delete-only distance), which
    credits a partly right completion more than `edit_similarity` does. Shown beside it, so figures reported on
    that benchmark compare; `edit_similarity` stays the project's measure."""
    p, r = prediction.rstrip(), reference.rstrip()
    total = len(p) + len(r)
    return 1.0 if total == 0 else 2 * longest_common_subsequence(p, r) / total


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    # Code is not English: no stemming, and rouge-score's default tokenizer would drop
    # punctuation, so split on whitespace and the punctuation code is made of.
    class CodeTokenizer:
        def tokenize(self, text: str) -> list[str]:
            import re

            return re.findall(r"\w+|[^\w\s]", text)

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=CodeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over code tokens (identifiers, numbers, single punctuation characters)."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def is_degenerate(token_ids: Sequence[int], window: int = 8, max_period: int = 4) -> bool:
    """True when the last `window` tokens repeat a cycle shorter than themselves (`a b a b a b a b`)."""
    tail = list(token_ids[-window:])
    if len(tail) < window:
        return False
    return any(all(tail[i] == tail[i % p] for i in range(window)) for p in range(1, max_period + 1))
