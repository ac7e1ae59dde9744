"""Drafts from the model's own first layers (LayerSkip's self-speculation, arXiv 2404.16710), for lossless mode.

A draft token runs blocks 0..E-1 of the full model and leaves by exit head E-1; nothing is written above block E-1
(the verification writes those K/V). On the native single-token step a draft's pass through the first E blocks is
the full model's own, bit for bit (the same step, the same weights), so its K/V there are the true values and its
residual stream after block E-1 is what the full model's block E reads: `FirstLayers` keeps those streams, and
lossless mode's verification starts at block E over them (`Lossless.verify_window`), reading the first E blocks'
weights once per drafted token instead of once more per round. Elsewhere (the torch path, batches, and lossless
mode with a stop threshold, whose check asks the controller after blocks below E too) the streams are not kept and
the verification runs every block, so the output is full mode's either way; only the speed differs.
"""

from __future__ import annotations

import torch

from ..errors import EarlyExitError
from .heads import ExitHeads, Thresholds
from .model import GPT2, KVCache
from .policies import BatchStep, EarlyExit, Policy, StepResult


def check_draft_layers(draft_layers, n_layer: int) -> int | None:
    """`draft_layers` as given to `Lossless`: None (drafts from the whole model) or E in [1, n_layer - 1]."""
    if draft_layers is None:
        return None
    if isinstance(draft_layers, bool) or not isinstance(draft_layers, int) or not 1 <= draft_layers < n_layer:
        raise EarlyExitError(f"draft_layers must be an integer in [1, {n_layer - 1}] (blocks a draft runs), got {draft_layers!r}")
    return draft_layers


class FirstLayers(Policy):
    """Every token through blocks 0..E-1 and exit head E-1 (the exit heads' LN + adapter, then the tied head): the
    drafter of `Lossless(draft_layers=E)`, or alone, the model cut to its first E blocks."""

    name = "first_layers"

    def __init__(self, model: GPT2, heads: ExitHeads, layers: int, kernel_backend: str = "auto", keep_streams: bool = False):
        self.layers = check_draft_layers(layers, model.dims.n_layer)
        self.head = EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0), kernel_backend)  # its exit_logits only
        self.keep_streams = keep_streams  # whether a verification will take them (`take_streams`)
        self.streams: dict[tuple[int, int], torch.Tensor] = {}  # (pos, token) -> stream after block E-1, native only

    @torch.inference_mode()
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> StepResult:
        """The prompt through blocks 0..E-1 only (decoding with this policy alone is a model E blocks deep)."""
        x = model.embed(ids, start)
        for layer in range(self.layers):
            x = model.block(layer, x, cache, start)
        return StepResult(self.head.exit_logits(self.layers - 1, x[:, -1], model), self.layers)

    @torch.inference_mode()
    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> BatchStep:
        x = model.embed(ids, 0)
        for layer in range(self.layers):
            x = model.block(layer, x, cache, 0)
        last = x[torch.arange(ids.shape[0]), lengths - 1]  # (B, d): each row's last real token
        return BatchStep(self.head.exit_logits(self.layers - 1, last, model), [self.layers] * ids.shape[0], [False] * ids.shape[0])

    def draft_stream(self, model: GPT2, token: int, cache: KVCache, pos: int) -> torch.Tensor | None:
        """The residual stream (1, d) after block E-1 for `token` at `pos` on the native step (its K/V of blocks
        0..E-1 written, exactly the full model's), or None where the model has no native step."""
        lean = model.lean
        if not hasattr(lean, "built") or lean.built() is None:  # built on first use: a first draft must not miss it
            return None
        return lean.blocks(0, self.layers, lean.embed(token, pos), cache, pos)

    @torch.inference_mode()
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        E = self.layers
        if token.shape == (1, 1) and isinstance(pos, int):
            x = self.draft_stream(model, int(token), cache, pos)
            if x is not None:
                if self.keep_streams:
                    self.streams[(pos, int(token))] = x
                return StepResult(self.head.exit_logits(E - 1, x, model), E)
        x = model.embed(token, pos)
        for layer in range(E):
            x = model.block(layer, x, cache, pos)
        return StepResult(self.head.exit_logits(E - 1, x[:, -1], model), E)

    @torch.inference_mode()
    def step_batch(self, model: GPT2, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor, prev_layers: torch.Tensor,
                   rows: torch.Tensor) -> BatchStep:
        x = model.embed(tokens, pos)
        for layer in range(self.layers):
            x = model.block(layer, x, cache, pos, rows)
        return BatchStep(self.head.exit_logits(self.layers - 1, x[:, -1], model), [self.layers] * tokens.shape[0],
                         [False] * tokens.shape[0])

    def take_streams(self, model: GPT2, window: list[int], cache: KVCache, pos: int) -> torch.Tensor | None:
        """The streams (T, d) after block E-1 of a verify window (the last written token, then the drafts) at
        positions pos..: the drafts' own for every token but the last, which runs blocks 0..E-1 here. None unless
        every one was drafted on the native step at that position; the kept streams are dropped either way."""
        kept, self.streams = self.streams, {}
        got = [kept.get((pos + i, t)) for i, t in enumerate(window[:-1])]
        if any(s is None for s in got):
            return None
        last = self.draft_stream(model, window[-1], cache, pos + len(window) - 1)
        return None if last is None else torch.cat([*got, last])
