"""Decoding policies behind one interface (`Policy`; `SpeculativePolicy` for drafting ones): how deep each
token goes, and whether to stop.

- `FullDepth`: every token runs every block (the reference, equal to transformers' greedy).
- `EarlyExit`: after each block the controller (earlyexit.runtime.heads) decides continue, exit
  or stop for the newest token. On exit the token comes from that layer's exit head and
  each skipped layer's K/V at this position is filled by state copying (ln_1 + K/V
  projection of the exit hidden state, through `earlyexit.kernels.state_copy`); on stop
  the completion ends before this token is written. Each layer's decision goes through
  `earlyexit.kernels.layer_check` (block's last residual add + classifier, fused on GPU).
  `exit_layers` limits where the controller is asked (the study asks after every block):
  a check costs a few ops, and at a layer where exits are rare it costs more than it saves.
  A model with a lean single-token path (`model.lean`, earlyexit.runtime.lean_step) decodes
  on it: the blocks, the check (layer norm + classifier, one host sync) and the state copy
  with no per-layer allocation beyond the ops themselves. On the native step
  (earlyexit.runtime.native) a token is one C++ call: blocks, the controller's checks or the
  exit heads' confidence, state copy and the head it leaves by (`ExitDecisions.native_controller`). Where and how it decides (thresholds,
  the exit rule, the fused check) is `earlyexit.runtime.exit_decisions.ExitDecisions`, which it extends.

A policy sees one token (B = 1) at a time and returns a `StepResult`: the next-token
logits, how many blocks ran, and whether to stop. For batched decoding
(`earlyexit.runtime.batch.complete_batch`) `prefill_batch` and `step_batch` do the same for B rows
at their own positions and return a `BatchStep`: under early exit each row exits or stops
on its own, and a layer runs only on the rows still in it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import EarlyExitError
from .exit_decisions import EXIT_RULES, ExitDecisions, check_confidence, check_exit_layers
from .heads import EXIT, STOP, ExitHeads, Thresholds
from .model import GPT2, KVCache

# the argument checks lived here before `exit_decisions` held them; importers still find them here
__all__ = ["EXIT_RULES", "BatchStep", "EarlyExit", "FullDepth", "Policy", "SpeculativePolicy", "StepResult", "check_confidence",
           "check_exit_layers", "check_policy"]


class Policy(ABC):
    """How deep each token goes, one token at a time: `complete` calls `prefill` once and `step` per token,
    `complete_batch` calls `prefill_batch` and `step_batch`. Full depth and early exit are policies."""

    name: str
    max_draft = 0  # tokens beyond the completion's own that the KV cache must hold (a speculative policy's drafts)

    @abstractmethod
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> "StepResult":
        """The prompt ids (1, T) through the model at positions start..start+T-1: the next token's logits, or a stop.
        `start` > 0: the cache already holds the K/V of the prompt's first `start` tokens (a server's prompt cache)."""

    @abstractmethod
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> "StepResult":
        """The newest token (1, 1) at `pos`; `prev_layers` is how many blocks the token before it ran."""

    @abstractmethod
    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> "BatchStep":
        """Right-padded prompts (B, T) of `lengths`."""

    @abstractmethod
    def step_batch(self, model: GPT2, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor, prev_layers: torch.Tensor,
                   rows: torch.Tensor) -> "BatchStep":
        """One token per row (B, 1), at per-row positions, into cache rows `rows`."""


class SpeculativePolicy(ABC):
    """Several tokens a round, drafted and verified (LayerSkip's self-speculation; ours: `Lossless`): after the
    prefill, `run` (`run_batch`) writes the whole completion into the transcript(s) and returns per-token times
    and its drafting statistics. Its tokens are full mode's, so no logits processor may change them."""

    name: str
    max_draft: int

    @abstractmethod
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> "StepResult":
        """As `Policy.prefill`."""

    @abstractmethod
    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> "BatchStep":
        """As `Policy.prefill_batch`."""

    @abstractmethod
    def run(self, model: GPT2, cache: KVCache, transcript, first_logits: torch.Tensor) -> tuple[str, list[float], dict]:
        """Decode to the end from the prefill's logits: (finish reason, per-token ms, statistics)."""

    @abstractmethod
    def run_batch(self, model: GPT2, cache: KVCache, transcripts, first_logits: torch.Tensor, stopped: list[bool]) -> list:
        """`run` for B rows: per row (finish reason, per-token ms, statistics)."""


def check_policy(policy) -> None:
    if not isinstance(policy, (Policy, SpeculativePolicy)):
        raise EarlyExitError(f"policy must be an earlyexit Policy or SpeculativePolicy (FullDepth, EarlyExit, Lossless), "
                             f"got {type(policy).__name__}")


@dataclass
class StepResult:
    logits: torch.Tensor | None  # (B, V) next-token logits; None when the controller stopped
    layers: int  # blocks this token ran through
    stop: bool = False


@dataclass
class BatchStep:
    logits: torch.Tensor  # (B, V); a stopped row's is meaningless
    layers: list[int]  # per row, the blocks it ran through
    stop: list[bool]  # per row, whether the controller stopped it


class FullDepth(Policy):
    """Every block, every token."""

    name = "full"

    @torch.inference_mode()
    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> BatchStep:
        """Right-padded prompts ids (B, T) of `lengths`: the logits after each row's last real token."""
        h = model.hidden(ids, cache, 0)
        B = ids.shape[0]
        return BatchStep(model.logits(h[torch.arange(B), lengths - 1]), [model.dims.n_layer] * B, [False] * B)

    @torch.inference_mode()
    def step_batch(self, model: GPT2, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor, prev_layers: torch.Tensor,
                   rows: torch.Tensor) -> BatchStep:
        """One token per row, tokens (B, 1) at per-row positions `pos` of cache rows `rows`."""
        B = tokens.shape[0]
        return BatchStep(model.logits(model.hidden(tokens, cache, pos, rows)[:, -1]), [model.dims.n_layer] * B, [False] * B)

    @torch.inference_mode()
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> StepResult:
        return self.step(model, ids, cache, start, model.dims.n_layer)

    @torch.inference_mode()
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        lean = model.lean  # an int8 copy's single-token path: the same logits, fewer ops
        if lean is not None and token.shape == (1, 1) and isinstance(pos, int):
            return StepResult(lean.logits(int(token), cache, pos), model.dims.n_layer)
        # only the newest position needs the vocabulary projection
        return StepResult(model.logits(model.hidden(token, cache, pos)[:, -1]), model.dims.n_layer)


class EarlyExit(ExitDecisions, Policy):
    """The stop/exit/continue controller of the study, over our exit heads, with state copying: the decisions
    (thresholds, where to ask, the rule) are `ExitDecisions`'; this class runs the blocks they are asked between."""

    name = "early-exit"

    def __init__(self, model: GPT2, heads: ExitHeads, thresholds: Thresholds | None = None, kernel_backend: str = "auto",
                 exit_layers=None, exit_head: str = "auto", exit_rule: str = "auto", confidence=None):
        super().__init__(model, heads, thresholds, kernel_backend, exit_layers, exit_head, exit_rule, confidence)
        self._blocks, self._state_copy_weights = model.h, None  # stacked on first use: the lean path never needs them

    @property
    def state_copy_weights(self):
        """Every block's ln_1 and K/V projection stacked (~6 MB for the default model), for the state-copy kernel of the
        generic and batched paths; built the first time one of them copies state."""
        if self._state_copy_weights is None:
            from ..kernels.dispatch import stack_state_copy_weights

            self._state_copy_weights = stack_state_copy_weights(self._blocks)
        return self._state_copy_weights

    @torch.inference_mode()
    def prefill(self, model: GPT2, ids: torch.Tensor, cache: KVCache, start: int = 0) -> StepResult:
        """The prompt runs every block (its K/V are needed anyway); the controller may still stop."""
        x = model.embed(ids, start)
        for layer in range(model.dims.n_layer):
            if not self.asks(layer, model.dims.n_layer):
                x = model.block(layer, x, cache, start)
                continue
            x_mid, mlp_out = model.block_branches(layer, x, cache, start)
            _, probs = self.check(layer, x_mid[:, -1], mlp_out[:, -1], 0)
            x = x_mid + mlp_out
            if self.decide(probs, allow_exit=False) == STOP:
                return StepResult(None, model.dims.n_layer, stop=True)
        return StepResult(model.logits(x[:, -1]), model.dims.n_layer)

    @torch.inference_mode()
    def step(self, model: GPT2, token: torch.Tensor, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        from ..kernels.dispatch import state_copy

        L = model.dims.n_layer
        lean = model.lean
        if lean is not None and token.shape == (1, 1) and isinstance(pos, int):
            return self.lean_step(model, int(token), cache, pos, prev_layers)
        x = model.embed(token, pos)
        for layer in range(L):
            if not self.asks(layer, L):
                x = model.block(layer, x, cache, pos)
                continue
            x_mid, mlp_out = model.block_branches(layer, x, cache, pos)
            h, probs = self.check(layer, x_mid[:, -1], mlp_out[:, -1], prev_layers)  # h: (1, d)
            x = h[:, None]
            action = self.decide(probs, allow_exit=self.controller_exits(layer, L))
            if action == STOP:
                return StepResult(None, layer + 1, stop=True)
            logits = None
            if action is None and self.confidence is not None and self.exits_at(layer, L):
                sure, logits = self.confident_exit(layer, h, model)
                action = EXIT if sure[0] else None
            if action == EXIT:
                state_copy(h, self.state_copy_weights, cache.k, cache.v, layer + 1, L - layer - 1, pos, backend=self.kernel_backend)
                return StepResult(self.exit_logits(layer, h, model) if logits is None else logits, layer + 1)
        return StepResult(model.logits(x[:, -1]), L)

    def lean_step(self, model: GPT2, token: int, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        """`step` on the model's lean single-token path: the same decisions from the same probabilities."""
        lean, L = model.lean, model.dims.n_layer
        native = getattr(lean, "decide", None)
        controller = self.native_controller(L) if native is not None else None
        decided = native(token, cache, pos, prev_layers, controller) if controller is not None else None
        if decided is not None:  # the whole token in one native call: blocks, checks, state copy, its head
            logits, layers, action = decided
            return StepResult(logits, layers, stop=action == STOP)
        x = lean.embed(token, pos)  # (1, d)
        done = 0  # blocks run so far: the blocks between two asked layers run in one call
        for layer in range(L):
            if not self.asks(layer, L):
                continue
            x, done = lean.blocks(done, layer + 1, x, cache, pos), layer + 1
            action, logits = None, None
            if self.stops_at(layer, L) or self.controller_exits(layer, L):  # the controller's probabilities are needed
                action = self.decide(self.lean_probs(layer, x, prev_layers), allow_exit=self.controller_exits(layer, L))
            if action == STOP:
                return StepResult(None, layer + 1, stop=True)
            if action is None and self.confidence is not None and self.exits_at(layer, L):
                sure, logits = self.confident_exit(layer, x, model, kernel=False)
                action = EXIT if sure[0] else None
            if action == EXIT:
                for skipped in range(layer + 1, L):
                    lean.fill_kv(skipped, x, cache, pos)
                return StepResult(self.exit_logits(layer, x, model) if logits is None else logits, layer + 1)
        x = lean.blocks(done, L, x, cache, pos)
        return StepResult(lean.final_logits(x), L)  # full mode's own head (native where built)

    @torch.inference_mode()
    def prefill_batch(self, model: GPT2, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> BatchStep:
        """`prefill` for right-padded prompts: every block runs on every row; each row's last real token may stop it."""
        B, L = ids.shape[0], model.dims.n_layer
        batch, last = torch.arange(B), lengths - 1
        stopped = [False] * B
        x = model.embed(ids, 0)
        for layer in range(L):
            if not self.asks(layer, L):
                x = model.block(layer, x, cache, 0)
                continue
            x_mid, mlp_out = model.block_branches(layer, x, cache, 0)
            _, probs = self.check_rows(layer, x_mid[batch, last], mlp_out[batch, last], 0)
            x = x_mid + mlp_out
            for b, p in enumerate(probs.tolist()):
                stopped[b] = stopped[b] or self.decide(p, allow_exit=False) == STOP
        return BatchStep(model.logits(x[batch, last]), [L] * B, stopped)

    @torch.inference_mode()
    def step_batch(self, model: GPT2, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor, prev_layers: torch.Tensor,
                   rows: torch.Tensor) -> BatchStep:
        """`step` for B rows at their own positions: after each block, rows that exit or stop leave the batch."""
        from ..kernels.dispatch import state_copy

        B, L = tokens.shape[0], model.dims.n_layer
        logits = torch.empty(B, model.dims.vocab_size, dtype=model.dtype, device=model.device)
        layers, stop = [L] * B, [False] * B
        live = torch.arange(B, device=tokens.device)  # rows of this batch still running
        x = model.embed(tokens, pos)
        for layer in range(L):
            if not self.asks(layer, L):
                x = model.block(layer, x, cache, pos[live], rows[live])
                continue
            x_mid, mlp_out = model.block_branches(layer, x, cache, pos[live], rows[live])
            h, probs = self.check_rows(layer, x_mid[:, -1], mlp_out[:, -1], prev_layers[live])  # h: (live, d)
            stay, leave = [], []
            for i, p in enumerate(probs.tolist()):
                action = self.decide(p, allow_exit=self.controller_exits(layer, L))
                (stay if action is None else leave).append(i)
                if action is not None:
                    b = int(live[i])
                    layers[b], stop[b] = layer + 1, action == STOP
            exits = [i for i in leave if not stop[int(live[i])]]
            confident_logits = None
            if stay and self.confidence is not None and self.exits_at(layer, L):  # the exit head decides the rest
                sure, confident_logits = self.confident_exit(layer, h[torch.tensor(stay, device=h.device)], model)
                exits = [i for i, ok in zip(stay, sure) if ok]
                stay = [i for i, ok in zip(stay, sure) if not ok]
                for i in exits:
                    layers[int(live[i])] = layer + 1
            if exits:
                e = torch.tensor(exits, device=h.device)
                out = live[e]
                state_copy(h[e], self.state_copy_weights, cache.k, cache.v, layer + 1, L - layer - 1, pos[out], rows=rows[out])
                logits[out] = self.exit_logits(layer, h[e], model) if confident_logits is None else confident_logits
            keep = torch.tensor(stay, dtype=torch.long, device=h.device)
            live, x = live[keep], h[keep][:, None]
            if not len(live):
                break
        if len(live):
            logits[live] = model.logits(x[:, -1])
        return BatchStep(logits, layers, stop)
