"""An n-gram cache over the code being completed, blended into the model's next-token distribution.

Code repeats itself locally: a file uses the names it defined, calls the helpers it wrote,
imports what it imported before (Tu, Su & Devanbu 2014, "On the localness of software",
measured an n-gram model with such a cache beating the same model without it on code).
A small model's attention copies some of that from its context window; the cache copies
from everything given, including the part of a long prompt that left-truncation dropped
(in an editor, the file above the cursor is usually longer than the context).

At each step the cache finds the longest suffix of the tokens so far (up to `MAX_ORDER`
tokens) that occurred earlier, counts the tokens that followed its earlier occurrences
into a distribution q, and the next-token distribution becomes (1 - w) p + w q. Where the
last token never occurred before, p is left as it is. Occurrences among the last
`SKIP_RECENT` tokens are not searched: the model copies recent text well by itself, and a
cache that copies the line just written makes greedy decoding write it again and again
(`if n < 2:` after `if n < 2: return False`); the sweep measured both effects. Masked
tokens (-inf, e.g. token healing's constraint) stay masked, so the cache never writes what
another rule forbade.

`GenerationSettings(cache_weight=w)` turns it on inside the runtime (the CLI's
`--ngram-cache`, on by default), searching the truncated part of the prompt too;
`NGramCacheLogitsProcessor` is the same rule for `GPT2LMHeadModel.generate`. The weight and
`SKIP_RECENT` were chosen on validation lines by `experiments/ngram_cache_sweep.py`;
`MAX_ORDER` was not swept there (an exploratory run on 300 validation lines scored a cap of
2 tokens below a cap of 8).
"""

from __future__ import annotations

import torch

from ..errors import EarlyExitError

MAX_ORDER = 8  # tokens of suffix matched at most (not swept by experiments/ngram_cache_sweep.py: see above)
DEFAULT_WEIGHT = 0.1  # the CLI's default blend weight (experiments/ngram_cache_sweep.py)
SKIP_RECENT = 32  # tokens before the current one whose occurrences are not searched (experiments/ngram_cache_sweep.py)


def check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise EarlyExitError(f"n-gram cache weight must be a number in [0, 1], got {weight!r}")
    return float(weight)


def check_skip_recent(skip_recent: int) -> int:
    if isinstance(skip_recent, bool) or not isinstance(skip_recent, int) or skip_recent < 0:
        raise EarlyExitError(f"n-gram cache skip_recent must be a non-negative integer, got {skip_recent!r}")
    return skip_recent


def continuations(sequence: torch.Tensor, max_order: int = MAX_ORDER, skip_recent: int = 0) -> torch.Tensor:
    """The tokens that followed the earlier occurrences of the longest suffix of `sequence` (1-D ids) that occurred
    before, matching at most `max_order` tokens: one entry per occurrence, empty where the last token is new.
    Occurrences whose following token is one of the last `skip_recent` tokens of `sequence` are not searched."""
    last = sequence.numel() - 1
    searched = last - skip_recent  # earlier copies of the suffix may end before this position
    if searched < 1:
        return sequence[:0]
    ends = (sequence[:searched] == sequence[last]).nonzero().flatten()  # where earlier copies of the suffix end
    for k in range(1, min(max_order, last + 1)):
        longer = ends[ends >= k]
        longer = longer[sequence[longer - k] == sequence[last - k]]
        if not longer.numel():
            break
        ends = longer
    return sequence[ends + 1]


def blend(scores: torch.Tensor, followers: torch.Tensor, weight: float) -> torch.Tensor:
    """Log of (1 - weight) softmax(scores) + weight q for one row of scores (V,), q the followers' frequencies;
    tokens masked in `scores` (-inf) stay masked. Unchanged where there are no followers or the weight is 0."""
    if not followers.numel() or weight == 0.0:
        return scores
    vocab = scores.shape[-1]
    followers = followers[followers < vocab].to(scores.device)
    if not followers.numel():
        return scores
    q = torch.bincount(followers, minlength=vocab).float() / followers.numel()
    mixed = ((1.0 - weight) * torch.softmax(scores.float(), dim=-1) + weight * q).log()
    return mixed.masked_fill(scores == float("-inf"), float("-inf")).to(scores.dtype)


def cached_scores(scores: torch.Tensor, sequence: torch.Tensor, weight: float, max_order: int = MAX_ORDER,
                  skip_recent: int = SKIP_RECENT) -> torch.Tensor:
    """The next-token scores (V,) after `sequence` (1-D ids) blended with the cache over it: what the runtime and the
    logits processor both write with."""
    return blend(scores, continuations(sequence, max_order, skip_recent), weight)


class NGramCacheLogitsProcessor:
    """The n-gram cache as a transformers logits processor (a callable `LogitsProcessorList` takes as it is, so importing
    this module does not import transformers): each row of `input_ids` is searched, after
    `context` (ids of text before the input, e.g. what left-truncation dropped), if given. Returns log-probabilities
    (the blend), so place it after processors that mask tokens and before any that expect raw logits.
    With left padding, the pad tokens are searched too: give unpadded rows for exact results."""

    def __init__(self, weight: float = DEFAULT_WEIGHT, max_order: int = MAX_ORDER, skip_recent: int = SKIP_RECENT, context=None):
        self.weight = check_weight(weight)
        if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
            raise EarlyExitError(f"n-gram cache max_order must be a positive integer, got {max_order!r}")
        self.max_order, self.skip_recent = max_order, check_skip_recent(skip_recent)
        self.context = None if context is None else torch.as_tensor(context, dtype=torch.long).flatten()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.weight == 0.0:
            return scores
        rows = []
        for ids, row in zip(input_ids, scores):
            ids = ids.cpu()
            sequence = ids if self.context is None or not self.context.numel() else torch.cat([self.context, ids])
            rows.append(cached_scores(row, sequence, self.weight, self.max_order, self.skip_recent))
        return torch.stack(rows)
