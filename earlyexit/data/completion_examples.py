"""Completion examples cut from files: the prompts the evaluations and experiments complete, each with its reference.

`token_cut_examples` is the study's task (a file cut at a random token, the next tokens as the target);
`line_cut_examples` is an editor's (a cut inside a line's code, the rest of that line as the target). Both draw
from a seeded `random.Random`, so the same files and seed give the same examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ..errors import EarlyExitError


@dataclass
class CompletionExample:
    """A prompt cut from a test file and the reference continuation that followed it."""

    path: str
    prompt: str
    target: str


def token_cut_examples(
    files: Sequence[dict[str, str]],
    tokenizer,
    n: int,
    target_tokens: int = 10,
    max_prompt_tokens: int = 512,
    seed: int = 0,
) -> list[CompletionExample]:
    """The study's examples: a file cut at a random token, target = the next `target_tokens`.

    The prompt keeps at most the last `max_prompt_tokens` tokens before the cut.
    """
    rng = random.Random(seed)
    encoded = [(f["path"], tokenizer.encode(f["text"])) for f in files]
    encoded = [(p, ids) for p, ids in encoded if len(ids) > target_tokens + 8]
    if not encoded:
        raise EarlyExitError("no file is long enough to cut completion examples from")
    out = []
    for _ in range(n):
        path, ids = rng.choice(encoded)
        cut = rng.randrange(8, len(ids) - target_tokens + 1)
        prompt_ids = ids[max(0, cut - max_prompt_tokens):cut]
        out.append(CompletionExample(path, tokenizer.decode(prompt_ids), tokenizer.decode(ids[cut:cut + target_tokens])))
    return out


def line_cut_examples(
    files: Sequence[dict[str, str]],
    n: int,
    max_prompt_chars: int = 2000,
    min_target_chars: int = 3,
    seed: int = 0,
) -> list[CompletionExample]:
    """Editor-style examples: a random point inside a line's code, target = the rest of that line.

    The cut falls after the line's indentation and leaves at least `min_target_chars`
    characters, so the prompt often ends in the middle of a word (what token healing is for).
    """
    rng = random.Random(seed)
    candidates: list[tuple[str, str, int, int]] = []  # (path, text, code start, line end)
    for f in files:
        text, pos = f["text"], 0
        for line in text.splitlines(keepends=True):
            body = line.rstrip("\r\n")
            stripped = body.lstrip()
            start = pos + len(body) - len(stripped)
            if len(stripped) > min_target_chars and not stripped.startswith("#"):
                candidates.append((f["path"], text, start, pos + len(body)))
            pos += len(line)
    if not candidates:
        raise EarlyExitError("no line is long enough to cut completion examples from")
    out = []
    for _ in range(n):
        path, text, start, end = rng.choice(candidates)
        cut = rng.randrange(start, end - min_target_chars + 1)
        out.append(CompletionExample(path, text[max(0, cut - max_prompt_chars):cut], text[cut:end]))
    return out
