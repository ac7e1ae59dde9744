"""Decoding policies behind one interface: how deep each token goes, and whether to stop.

- `FullDepth`: every token runs every block (the reference, equal to transformers' greedy).
- `EarlyExit`: after each block the controller (earlyexit.heads) decides continue, exit
  or stop for the newest token. On exit the token comes from that layer's exit head and
  each skipped layer's K/V at this position is filled by state copying (ln_1 + K/V
  projection of the exit hidden state, through `earlyexit.kernels.state_copy`); on stop
  the completion ends before this token is written.

A policy sees one token (B = 1) at a time and returns a `StepResult`: the next-token
logits, how many blocks ran, and whether to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .heads import EXIT, STOP, ExitHeads, Thresholds
from .model import GPT2, KVCache


@dataclass
class StepResult:
    logits: torch.Tensor | None  # (B, V) next-token logits; None when the controller stopped
    layers: int  # blocks this token ran through
    stop: bool = False


class FullDepth:
    """Every block, every token."""

    name = "full"

    @torch.inference_mode()
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache) -> StepResult:
        x = model.embed(ids, 0)
        for layer in range(model.dims.n_layer):
            x = model.block(layer, x, cache, 0)
        return StepResult(model.logits(x[:, -1]), model.dims.n_layer)

    @torch.inference_mode()
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        x = model.embed(token, pos)
        for layer in range(model.dims.n_layer):
            x = model.block(layer, x, cache, pos)
        return StepResult(model.logits(x[:, -1]), model.dims.n_layer)


class EarlyExit:
    """The stop/exit/continue controller of the study, over our exit heads, with state copying."""

    name = "early-exit"

    def __init__(self, model: GPT2, heads: ExitHeads, thresholds: Thresholds | None = None, kernel_backend: str = "auto"):
        from .kernels import stack_state_copy_weights

        self.heads = heads
        self.thresholds = thresholds or heads.cfg.thresholds
        self.state_copy_weights = stack_state_copy_weights(model.h)
        self.kernel_backend = kernel_backend

    def decide(self, layer: int, h: torch.Tensor, prev_layers: int, allow_exit: bool) -> int | None:
        """EXIT, STOP or None (continue) for the newest token's hidden state h (1, d) after `layer`."""
        probs = self.heads.action_logits(layer, h, prev_layers).softmax(-1)[0]  # (3,)
        action = int(probs.argmax())
        if action == STOP and probs[STOP] > self.thresholds.stop:
            return STOP
        if allow_exit and action == EXIT and probs[EXIT] > self.thresholds.exit:
            return EXIT
        return None

    @torch.inference_mode()
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache) -> StepResult:
        """The prompt runs every block (its K/V are needed anyway); the controller may still stop."""
        x = model.embed(ids, 0)
        for layer in range(model.dims.n_layer):
            x = model.block(layer, x, cache, 0)
            if self.decide(layer, x[:, -1], 0, allow_exit=False) == STOP:
                return StepResult(None, model.dims.n_layer, stop=True)
        return StepResult(model.logits(x[:, -1]), model.dims.n_layer)

    @torch.inference_mode()
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        from .kernels import state_copy

        L = model.dims.n_layer
        x = model.embed(token, pos)
        for layer in range(L):
            x = model.block(layer, x, cache, pos)
            h = x[:, -1]  # (1, d)
            action = self.decide(layer, h, prev_layers, allow_exit=layer < L - 1)
            if action == STOP:
                return StepResult(None, layer + 1, stop=True)
            if action == EXIT:
                state_copy(h, self.state_copy_weights, cache.k, cache.v, layer + 1, L - layer - 1, pos, backend=self.kernel_backend)
                return StepResult(self.heads.head_logits(layer, h, model), layer + 1)
        return StepResult(model.logits(x[:, -1]), L)
