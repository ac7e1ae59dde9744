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
from typing import Sequence

import torch

from .decoding import Completion, GenerationSettings, Transcript, check_reproducible, per_kept_token, prepare_prompt
from ..errors import EarlyExitError
from .model import GPT2
from .policies import FullDepth, SpeculativePolicy


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
    speculative = isinstance(policy, SpeculativePolicy)
    if isinstance(prompts, str) or not len(prompts):
        raise EarlyExitError("complete_batch takes a non-empty list of prompts (use complete for one)")
    rows = [prepare_prompt(tokenizer, model, p, settings) for p in prompts]
    B = len(rows)
    lengths = torch.tensor([len(r[0]) for r in rows], device=model.device)
    padded = torch.full((B, int(lengths.max())), tokenizer.eos_token_id, dtype=torch.long, device=model.device)
    for b, (ids, *_) in enumerate(rows):
        padded[b, :len(ids)] = torch.tensor(ids)
    capacity = int(lengths.max()) + settings.max_new_tokens + policy.max_draft + 1
    cache = model.new_cache(batch=B, capacity=min(model.dims.n_positions, capacity))
    transcripts = [Transcript(tokenizer, settings, torch.tensor([ids], device=model.device), stopping_criteria, healed, truncated)
                   for ids, healed, truncated in rows]
    finish: list[str | None] = [None] * B
    token_ms: list[list[float]] = [[] for _ in range(B)]

    def write(b: int, logits: torch.Tensor, layers: int, stopped: bool, ms: float | None) -> None:
        finish[b] = transcripts[b].write_next(logits, layers, stopped, logits_processor)
        if ms is not None and not stopped:
            token_ms[b].append(ms)

    t0 = time.perf_counter()
    first = policy.prefill_batch(model, padded, lengths, cache)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    stats: list[dict] = [{} for _ in range(B)]
    if speculative:
        first_logits = torch.cat([t.constrain(first.logits[b:b + 1]) for b, t in enumerate(transcripts)])
        for b, (reason, ms, row_stats) in enumerate(policy.run_batch(model, cache, transcripts, first_logits, first.stop)):
            finish[b], token_ms[b], stats[b] = reason, ms, row_stats
    else:
        for b in range(B):
            write(b, first.logits[b:b + 1], first.layers[b], first.stop[b], None)
    while not speculative:
        live = [b for b in range(B) if finish[b] is None]
        if not live:
            break
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
            write(b, step.logits[i:i + 1], step.layers[i], step.stop[i], ms)
    return [
        Completion(text=t.final_text(), token_ids=t.new, prompt_tokens=len(ids), finish_reason=finish[b], exit_layers=t.layers,
                   prefill_ms=prefill_ms, token_ms=per_kept_token(token_ms[b], len(t.new)), prompt_truncated_tokens=len(truncated),
                   speculation=stats[b], healed_prefix=healed)
        for b, (t, (ids, healed, truncated)) in enumerate(zip(transcripts, rows))
    ]
