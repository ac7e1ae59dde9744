"""Lossless mode: self-speculative decoding, exactly the full model's greedy output, fewer full passes.

Each round drafts up to k tokens with the early-exit policy (shallow, state-copied K/V;
stopping disabled), then runs the full model once over the last written token and the
drafts at their positions. Draft i is kept while it equals the full model's own greedy
token at that position; at the first disagreement the full model's token is written
instead, and when all drafts agree the full model's next token comes as a bonus. The
verify pass rewrites every layer's K/V at the drafted positions, so whatever the drafts
state-copied is replaced by the true values; positions past the accepted prefix are
rewritten before any later token can attend to them (attention reads only positions at
or before its own). Rolling back is therefore just carrying on from the accepted position.

With `adaptive`, k grows by one after a round whose drafts were all accepted and falls to
one more than the accepted count after a rejection, within [1, max_draft].
"""

from __future__ import annotations

import time

import torch

from .heads import ExitHeads, Thresholds
from .model import GPT2, KVCache
from .policies import EarlyExit, FullDepth, StepResult


@torch.inference_mode()
def verify(model: GPT2, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """Full-depth pass over tokens (1, T) at positions pos..pos+T-1: greedy next tokens (T,)."""
    return model(tokens, cache, pos)[0].argmax(-1)


class Lossless:
    """Draft with exits, verify with the full model: `full` mode's tokens, faster."""

    name = "lossless"
    speculative = True

    def __init__(self, model: GPT2, heads: ExitHeads, exit_threshold: float | None = None, max_draft: int = 4,
                 adaptive: bool = True, kernel_backend: str = "auto"):
        if not isinstance(max_draft, int) or max_draft < 1:
            from .errors import EarlyExitError

            raise EarlyExitError(f"max_draft must be a positive integer, got {max_draft!r}")
        exit_threshold = heads.cfg.thresholds.exit if exit_threshold is None else exit_threshold
        self.thresholds = Thresholds(exit=exit_threshold, stop=1.0)  # a draft never stops the completion
        self.drafter = EarlyExit(model, heads, self.thresholds, kernel_backend)
        self.max_draft, self.adaptive = max_draft, adaptive

    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache) -> StepResult:
        return FullDepth().prefill(model, ids, cache)

    def draft(self, model: GPT2, cache: KVCache, last: int, pos: int, prev_layers: int, n: int, eos: int) -> tuple[list[int], list[int]]:
        """Up to n draft tokens after `last` (at `pos`), with the layers each one used."""
        tokens, layers = [], []
        token = torch.tensor([[last]], device=model.device)
        for i in range(n):
            r = self.drafter.step(model, token, cache, pos + i, prev_layers)
            tokens.append(int(r.logits.argmax(-1)))
            layers.append(r.layers)
            prev_layers = r.layers
            if tokens[-1] == eos:
                break
            token = token.new_tensor([[tokens[-1]]])
        return tokens, layers

    def run(self, model: GPT2, cache: KVCache, transcript, first_logits: torch.Tensor):
        """Write tokens into `transcript` until it ends: (finish reason, ms per token, drafting statistics)."""
        L = model.dims.n_layer
        eos = transcript.tokenizer.eos_token_id
        finish = transcript.write(int(first_logits.argmax(-1)), L)
        k, drafted, accepted, rounds, token_ms = self.max_draft, 0, 0, 0, []
        while finish is None:
            t0 = time.perf_counter()
            pos = transcript.input_ids.shape[1] - 1  # the last written token: its K/V are not in the cache yet
            budget = transcript.settings.max_new_tokens - len(transcript.new)
            drafts, layers = self.draft(model, cache, transcript.new[-1], pos, transcript.layers[-1], min(k, budget), eos)
            window = torch.tensor([[transcript.new[-1], *drafts]], device=model.device)  # (1, n + 1)
            truth = verify(model, window, cache, pos).tolist()  # the full model's token after each
            m = next((i for i, (d, g) in enumerate(zip(drafts, truth)) if d != g), len(drafts))
            written = 0
            for token, used in [*zip(drafts[:m], layers[:m]), (truth[m], L)]:
                finish = transcript.write(token, used)
                written += 1
                if finish is not None:
                    break
            drafted, accepted, rounds = drafted + len(drafts), accepted + m, rounds + 1
            if self.adaptive:
                k = min(self.max_draft, k + 1) if m == len(drafts) else max(1, m + 1)
            token_ms += [(time.perf_counter() - t0) * 1e3 / written] * written
        stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None,
                 "rounds": rounds, "max_draft": self.max_draft, "adaptive": self.adaptive}
        return finish, token_ms[: max(0, len(transcript.new) - 1)], stats
