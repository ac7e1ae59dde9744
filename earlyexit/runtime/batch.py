"""Batched greedy decoding, for evaluation throughput: B prompts at once, each row its own completion.

`complete_batch` takes what `complete` takes, with a list of prompts, and returns one
`Completion` per prompt, equal row for row to what `complete` returns for that prompt
alone (tested). Prompts are right-padded into one prefill; every later step runs the
rows still writing, each at its own position of its own cache row, so rows of different
lengths never shift each other's positions. Under early exit a row exits or stops on its
own and a layer runs only on the rows still in it; a finished row leaves the batch.

Lossless mode runs its own batched rounds (`Lossless.run_batch`): rows draft together
for as long as each row's own draft length allows, then every row's window is verified in
one full-depth pass at its own positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .decoding import Completion, GenerationSettings, Transcript, check_reproducible, per_kept_token, prepare_prompt
from ..errors import EarlyExitError
from .model import GPT2
from .policies import BatchStep, FullDepth, SpeculativePolicy


@dataclass
class _Rows:
    """The batch's rows as they decode: each row's transcript, its finish reason once it has one, the times of its
    tokens after the first, and (a speculative policy) its drafting statistics."""

    transcripts: list[Transcript]
    logits_processor: object = None
    finish: list[str | None] = field(init=False)
    token_ms: list[list[float]] = field(init=False)
    stats: list[dict] = field(init=False)

    def __post_init__(self):
        B = len(self.transcripts)
        self.finish, self.token_ms, self.stats = [None] * B, [[] for _ in range(B)], [{} for _ in range(B)]

    def write(self, b: int, logits: torch.Tensor, layers: int, stopped: bool, ms: float | None) -> None:
        self.finish[b] = self.transcripts[b].write_next(logits, layers, stopped, self.logits_processor)
        if ms is not None and not stopped:
            self.token_ms[b].append(ms)

    def live(self) -> list[int]:
        """The rows still writing."""
        return [b for b in range(len(self.transcripts)) if self.finish[b] is None]


def _pad(model: GPT2, tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared prompts right-padded with EOS into ids (B, T), and their lengths (B,)."""
    lengths = torch.tensor([len(r[0]) for r in rows], device=model.device)
    padded = torch.full((len(rows), int(lengths.max())), tokenizer.eos_token_id, dtype=torch.long, device=model.device)
    for b, (ids, *_) in enumerate(rows):
        padded[b, :len(ids)] = torch.tensor(ids)
    return padded, lengths


def _prefill(model: GPT2, policy, padded: torch.Tensor, lengths: torch.Tensor, cache) -> tuple[BatchStep, float]:
    """Every prompt through the model in one pass: the first token's logits per row, and the pass's milliseconds."""
    t0 = time.perf_counter()
    first = policy.prefill_batch(model, padded, lengths, cache)
    return first, (time.perf_counter() - t0) * 1e3


def _decode_speculative(model: GPT2, policy: SpeculativePolicy, cache, batch: _Rows, first: BatchStep) -> None:
    """A speculative policy's own batched rounds, from the prefill's logits to every row's end."""
    first_logits = torch.cat([t.constrain(first.logits[b:b + 1]) for b, t in enumerate(batch.transcripts)])
    for b, (reason, ms, row_stats) in enumerate(policy.run_batch(model, cache, batch.transcripts, first_logits, first.stop)):
        batch.finish[b], batch.token_ms[b], batch.stats[b] = reason, ms, row_stats


def _decode_one_token(model: GPT2, policy, cache, batch: _Rows, live: list[int]) -> None:
    """One token for each of the `live` rows, each at its own position of its own cache row."""
    transcripts = batch.transcripts
    t0 = time.perf_counter()
    step = policy.step_batch(
        model,
        torch.tensor([[transcripts[b].new[-1]] for b in live], device=model.device),
        cache,
        torch.tensor([transcripts[b].position for b in live], device=model.device),
        torch.tensor([transcripts[b].layers[-1] for b in live], device=model.device),
        torch.tensor(live, device=model.device),
    )
    ms = (time.perf_counter() - t0) * 1e3
    for i, b in enumerate(live):
        batch.write(b, step.logits[i:i + 1], step.layers[i], step.stop[i], ms)


def _decode_tokens(model: GPT2, policy, cache, batch: _Rows, first: BatchStep) -> None:
    """Write the prefill's token for every row, then step the rows still writing until none is."""
    for b in range(len(batch.transcripts)):
        batch.write(b, first.logits[b:b + 1], first.layers[b], first.stop[b], None)
    while live := batch.live():
        _decode_one_token(model, policy, cache, batch, live)


@torch.inference_mode()
def complete_batch(
    model: GPT2,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    settings: GenerationSettings | None = None,
    logits_processor=None,
    stopping_criteria=None,
    policy=None,
) -> list[Completion]:
    settings = settings or GenerationSettings()
    policy = policy or FullDepth()
    check_reproducible(policy, logits_processor, settings)
    if isinstance(prompts, str) or not len(prompts):
        raise EarlyExitError("complete_batch takes a non-empty list of prompts (use complete for one)")
    rows = [prepare_prompt(tokenizer, model, p, settings) for p in prompts]
    padded, lengths = _pad(model, tokenizer, rows)
    capacity = int(lengths.max()) + settings.max_new_tokens + policy.max_draft + 1
    cache = model.new_cache(batch=len(rows), capacity=min(model.dims.n_positions, capacity))
    batch = _Rows([Transcript(tokenizer, settings, torch.tensor([ids], device=model.device), stopping_criteria, healed, truncated)
                   for ids, healed, truncated in rows], logits_processor)
    first, prefill_ms = _prefill(model, policy, padded, lengths, cache)
    if isinstance(policy, SpeculativePolicy):
        _decode_speculative(model, policy, cache, batch, first)
    else:
        _decode_tokens(model, policy, cache, batch, first)
    return [
        Completion(text=t.final_text(), token_ids=t.new, prompt_tokens=len(ids), finish_reason=batch.finish[b], exit_layers=t.layers,
                   prefill_ms=prefill_ms, token_ms=per_kept_token(batch.token_ms[b], len(t.new)),
                   prompt_truncated_tokens=len(truncated), speculation=batch.stats[b], healed_prefix=healed)
        for b, (t, (ids, healed, truncated)) in enumerate(zip(batch.transcripts, rows))
    ]
