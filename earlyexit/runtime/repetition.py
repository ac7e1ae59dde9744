"""Loop detection for greedy completions.

A small model's most common way to go wrong under greedy decoding is a loop: the same
line or block written again (`if n < 2: return False` four times), or a phrase inside a
line (`list of list of list of`). Once the tokens repeat with a period, greedy decoding
never leaves the cycle. `loop_tail` finds such a cycle at the end of what was written and
says how many tokens to drop so that one copy stays (a loop of lines is cut at a line
break inside that copy, so the completion ends with a whole line); `GenerationSettings(
stop_on_repetition=True)` (on by default in the CLI) ends the completion there, with
finish reason "repetition".

What counts as a loop, to leave legitimate repetition alone:
- a block of two or more lines after two copies; one line, or a phrase inside a line,
  after three, and only once the copies span 8 tokens (the `is_degenerate` window of
  `earlyexit.evaluation.metrics`): a line legitimately written twice (`next(f)` to skip two header
  lines) or `a, a` stays;
- only cycles whose text holds a letter, an underscore or a line break: `[0, 0, 0, 0]`,
  `====` or `)))` is data or layout, not a loop; eight line breaks in a row are one.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

MAX_PERIOD = 48  # tokens: a block of a few lines
MIN_LOOP_TOKENS = 8
_WORDLIKE = re.compile(r"[A-Za-z_]")


def loop_tail(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], max_period: int = MAX_PERIOD) -> int:
    """How many tokens to drop from the end of `token_ids` so that a repeating tail keeps one copy; 0 when it does not loop."""
    ids = list(token_ids)
    n = len(ids)
    for p in range(1, min(max_period, n // 2) + 1):
        if ids[-1] != ids[-1 - p]:  # the cheap test that rules out almost every period
            continue
        run = p  # length of the longest suffix with period p
        while run < n and ids[n - 1 - run] == ids[n - 1 - run + p]:
            run += 1
        copies = run // p
        if copies < 2:
            continue
        text = decode(ids[-p:])
        if not (_WORDLIKE.search(text) or "\n" in text):
            continue
        needed = max(2 if text.count("\n") >= 2 else 3, math.ceil(MIN_LOOP_TOKENS / p))
        if copies >= needed:
            cut = n - p * (copies - 1)  # the second copy starts here
            if "\n" in text:  # a loop of lines: end the kept copy at a line's end, not inside the next line
                cut = next((c for c in range(cut, cut - p, -1) if _line_boundary(ids, c, decode)), cut)
            return n - cut
    return 0


def _line_boundary(ids: list[int], c: int, decode) -> bool:
    """Whether a cut before ids[c] falls at a line break (tokens may carry it at their start or their end)."""
    return decode(ids[c:c + 1]).startswith("\n") or decode(ids[c - 1:c]).endswith("\n")
