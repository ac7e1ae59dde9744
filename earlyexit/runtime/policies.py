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
  with no per-layer allocation beyond the ops themselves.

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
import torch.nn.functional as F

from ..errors import EarlyExitError
from .heads import EXIT, STOP, ExitHeads, Thresholds
from .model import GPT2, KVCache


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


def check_exit_layers(exit_layers, n_layer: int) -> frozenset[int] | None:
    """`exit_layers` as given to `EarlyExit`: None or "all" (every layer), or 0-based block indices below the last
    (none: exits never pay on this model, earlyexit.training.exit_layers found; the controller may still stop at the last)."""
    if exit_layers is None or exit_layers == "all":
        return None
    if isinstance(exit_layers, (str, bytes)) or not hasattr(exit_layers, "__iter__"):
        raise EarlyExitError(f"exit_layers must be a list of layer indices, got {type(exit_layers).__name__} {exit_layers!r}")
    layers = list(exit_layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layer - 1]
    if bad:
        raise EarlyExitError(f"exit_layers must be 0-based block indices in [0, {n_layer - 2}] (--exit-layers counts from 1: "
                             f"1..{n_layer - 1}; leaving after the last block is not an exit), got {layers!r}")
    return frozenset(layers)


EXIT_RULES = ("auto", "controller", "confidence")


def check_confidence(confidence, n_layer: int, layers) -> dict[int, float] | None:
    """`confidence` as given to `EarlyExit`: None, one threshold in [0, 1] for each of `layers`, or {layer: threshold}
    with 0-based layers below the last (JSON's string keys accepted): the exit head's max probability to exit at."""
    if confidence is None:
        return None
    if isinstance(confidence, (int, float)) and not isinstance(confidence, bool):
        confidence = {layer: confidence for layer in layers}
    if not isinstance(confidence, dict):
        raise EarlyExitError(f"confidence must be a threshold in [0, 1] or a {{layer: threshold}} dict, got {type(confidence).__name__}")
    out = {}
    for key, value in confidence.items():
        layer = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layer - 1:
            raise EarlyExitError(f"confidence layers must be 0-based block indices in [0, {n_layer - 2}], got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise EarlyExitError(f"confidence threshold of layer {layer} must be a number in [0, 1], got {value!r}")
        out[layer] = float(value)
    return out


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


class EarlyExit(Policy):
    """The stop/exit/continue controller of the study, over our exit heads, with state copying."""

    name = "early-exit"

    def __init__(self, model: GPT2, heads: ExitHeads, thresholds: Thresholds | None = None, kernel_backend: str = "auto",
                 exit_layers=None, exit_head: str = "auto", exit_rule: str = "auto", confidence=None):
        from .quantize import RerankedHead

        if not isinstance(heads, ExitHeads):
            raise EarlyExitError(f"EarlyExit needs ExitHeads (earlyexit.runtime.heads.load_heads), got {type(heads).__name__}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise EarlyExitError(f"thresholds must be a Thresholds(exit=..., stop=...), got {type(thresholds).__name__} {thresholds!r}")
        self.heads = heads
        self.thresholds = thresholds or heads.cfg.thresholds
        self._blocks, self._state_copy_weights = model.h, None  # stacked on first use: the lean path never needs them
        self.kernel_backend = kernel_backend
        # The classifier's whole bias for every (layer, previous exit) pair, computed once from the heads as they
        # are now: bias_table[l, p] = cls.bias + E_layer[l] + E_prev for p (0: no previous token).
        L = heads.cfg.n_layer
        with torch.no_grad():
            table = heads.cls.bias + heads.extra_bias(torch.arange(L)[:, None], torch.arange(L + 1)[None, :])
        self.bias_table = table.detach().float().contiguous()  # (L, L + 1, 3)
        self._bias_rows = [list(self.bias_table[layer]) for layer in range(L)]  # views: no indexing per call
        self._no_bias = torch.zeros_like(self.bias_table[0, 0])
        # None: the heads' own choice (exit_heads.json, earlyexit.training.exit_layers), which is every layer by default
        self.exit_layers = check_exit_layers(heads.cfg.exit_layers if exit_layers is None else exit_layers, L)
        # A token that exits takes its logits from an int8 copy of the vocabulary projection, the top 8 recomputed in
        # fp32 (the fp32 head's argmax whenever its winner is among them): on a CPU the head is most of what an exit
        # still reads. Tokens that run every block keep the model's own head, so with exits off the tokens are full's.
        if exit_head not in ("auto", "int8", "fp32"):
            raise EarlyExitError(f"exit_head must be auto, int8 or fp32, got {exit_head!r}")
        if exit_head == "int8" and not RerankedHead.supports(model):
            raise EarlyExitError("exit_head='int8' needs an fp32 GPT2 whose width the int8 op takes (a multiple of 16)")
        fast = exit_head == "int8" or (exit_head == "auto" and RerankedHead.supports(model) and model.device.type == "cpu")
        self.exit_head = RerankedHead(model.head_weight) if fast else None
        self._cls_t = heads.cls.weight.detach().float().t()  # (d, 3): layer_check_reference's operand, as a view
        # Who decides an exit. "controller": p(exit) above thresholds.exit (the study's rule). "confidence": the exit
        # head's own max probability at least the layer's threshold, asked at the layers those thresholds name; the
        # controller still decides stops. At 99% agreement the head's confidence lets 4-7x more tokens leave after
        # blocks 9-11 of the default model than p(exit) (experiments/results/exit_signals). thresholds.exit < 1 stays
        # the switch that turns exits on. "auto": confidence where the heads carry calibrated thresholds.
        if exit_rule not in EXIT_RULES:
            raise EarlyExitError(f"exit_rule must be one of {EXIT_RULES}, got {exit_rule!r}")
        from .quantize import Int8GPT2

        # an int8 copy has its own calibration (its blocks cost a quarter as much, its head about the same); {} is one
        # that found no exit paying; without one it takes the fp32 model's
        calibrated = heads.cfg.exit_confidence
        if isinstance(model, Int8GPT2) and heads.cfg.exit_confidence_int8 is not None:
            calibrated = heads.cfg.exit_confidence_int8
        if exit_rule == "controller":
            if confidence is not None:
                raise EarlyExitError("confidence thresholds apply to exit_rule='confidence' (or 'auto'), not 'controller'")
            self.confidence = None
        else:
            if exit_rule == "confidence" and confidence is None and calibrated is None:
                raise EarlyExitError("these exit heads carry no confidence thresholds: run python -m earlyexit.training.confidence_rule, "
                                     "or give confidence=")
            default_layers = ([int(k) for k in calibrated] if calibrated else
                              sorted(self.exit_layers) if self.exit_layers is not None else range(L - 1))
            self.confidence = check_confidence(confidence if confidence is not None else calibrated, L, default_layers)
        self.exit_rule = "confidence" if self.confidence is not None else "controller"

    @property
    def state_copy_weights(self):
        """Every block's ln_1 and K/V projection stacked (~6 MB for the default model), for the state-copy kernel of the
        generic and batched paths; built the first time one of them copies state."""
        if self._state_copy_weights is None:
            from ..kernels.dispatch import stack_state_copy_weights

            self._state_copy_weights = stack_state_copy_weights(self._blocks)
        return self._state_copy_weights

    def exit_logits(self, layer: int, h: torch.Tensor, model: GPT2) -> torch.Tensor:
        """Logits (..., V) of a token leaving after block `layer` (below the last) from its hidden state h (..., d)."""
        if self.exit_head is None:
            return self.heads.head_logits(layer, h, model)
        return self.exit_head(self.heads.head_hidden(layer, h))

    def asks(self, layer: int, n_layer: int) -> bool:
        """Whether anything is decided after block `layer`: an exit (an exit layer below the last) or a stop (every
        asked layer, and the last); never where no action could win at the current thresholds."""
        return self.exits_at(layer, n_layer) or self.stops_at(layer, n_layer)

    def exits_at(self, layer: int, n_layer: int) -> bool:
        """Whether a token may exit after block `layer`, by the controller or by the exit head's confidence."""
        if layer >= n_layer - 1 or self.thresholds.exit >= 1:
            return False
        if self.confidence is not None:
            return layer in self.confidence
        return self.exit_layers is None or layer in self.exit_layers

    def stops_at(self, layer: int, n_layer: int) -> bool:
        """Whether the controller is asked to stop after block `layer`."""
        return self.thresholds.stop < 1 and (self.exit_layers is None or layer in self.exit_layers or layer == n_layer - 1)

    def controller_exits(self, layer: int, n_layer: int) -> bool:
        """Whether the controller's p(exit) may decide an exit after block `layer` (not under the confidence rule)."""
        return self.confidence is None and layer < n_layer - 1

    def confident(self, layer: int, logits: torch.Tensor) -> list[bool]:
        """Per row of exit logits (B, V), whether the exit head's max probability reaches the layer's threshold: the
        confidence rule's decision, one host sync. Compared in float64, as `decide` compares thresholds in Python."""
        top = logits.float().softmax(-1).amax(-1)
        return (top.double() >= self.confidence[layer]).tolist()

    def check(self, layer: int, x_mid: torch.Tensor, mlp_out: torch.Tensor, prev_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish block `layer` for the newest token and ask the controller, in one fused call.

        x_mid, mlp_out: (1, d). Returns the block output h (1, d) and action probabilities (3,).
        """
        h, probs = self.check_rows(layer, x_mid, mlp_out, prev_layers)
        return h, probs[0]

    def check_rows(self, layer: int, x_mid: torch.Tensor, mlp_out: torch.Tensor, prev_layers) -> tuple[torch.Tensor, torch.Tensor]:
        """`check` for B rows: x_mid, mlp_out (B, d), prev_layers an int or (B,) -> h (B, d), probabilities (B, 3)."""
        from ..kernels.dispatch import layer_check

        heads = self.heads
        if isinstance(prev_layers, int):  # one bias for every row
            bias, extra = self._bias_rows[layer][prev_layers], None
        else:
            bias, extra = self._no_bias, self.bias_table[layer][prev_layers]  # (B, 3)
        return layer_check(x_mid, mlp_out, heads.cls_ln.weight, heads.cls_ln.bias, heads.cls.weight, bias,
                           extra, heads.cls_ln.eps, backend=self.kernel_backend)

    def decide(self, probs, allow_exit: bool) -> int | None:
        """EXIT, STOP or None (continue) from the action probabilities (3,) (a tensor or a list).

        The one host sync of the layer: three floats come back, the comparisons are Python's.
        """
        p = probs.tolist() if isinstance(probs, torch.Tensor) else probs
        action = max(range(3), key=p.__getitem__)
        if action == STOP and p[STOP] > self.thresholds.stop:
            return STOP
        if allow_exit and action == EXIT and p[EXIT] > self.thresholds.exit:
            return EXIT
        return None

    def stops(self, probs: torch.Tensor) -> torch.Tensor:
        """`decide(...) == STOP` for many rows of action probabilities (N, 3) at once, on the device: (N,) bool.
        The threshold is compared in float64, as `decide` compares it in Python: against a float32 tensor, torch would
        round it to float32 first, and a probability equal to that rounding would stop in one and not the other."""
        return (probs.argmax(-1) == STOP) & (probs[:, STOP].double() > self.thresholds.stop)

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
                logits = self.exit_logits(layer, h, model)
                action = EXIT if self.confident(layer, logits)[0] else None
            if action == EXIT:
                state_copy(h, self.state_copy_weights, cache.k, cache.v, layer + 1, L - layer - 1, pos, backend=self.kernel_backend)
                return StepResult(self.exit_logits(layer, h, model) if logits is None else logits, layer + 1)
        return StepResult(model.logits(x[:, -1]), L)

    def lean_step(self, model: GPT2, token: int, cache: KVCache, pos: int, prev_layers: int) -> StepResult:
        """`step` on the model's lean single-token path: the same decisions from the same probabilities."""
        lean, L = model.lean, model.dims.n_layer
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
                logits = self.exit_logits(layer, x, model)
                action = EXIT if self.confident(layer, logits)[0] else None
            if action == EXIT:
                for skipped in range(layer + 1, L):
                    lean.fill_kv(skipped, x, cache, pos)
                return StepResult(self.exit_logits(layer, x, model) if logits is None else logits, layer + 1)
        x = lean.blocks(done, L, x, cache, pos)
        return StepResult(lean.final_logits(x), L)  # full mode's own head (native where built)

    def lean_probs(self, layer: int, h: torch.Tensor, prev_layers: int) -> list[float]:
        """The action probabilities after block `layer` for one fp32 row h (1, d), as `layer_check_reference` computes
        them (the same ops on the same operands, so the same floats), brought to the host: the layer's one sync."""
        ln = self.heads.cls_ln
        z = F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, ln.eps)
        return torch.addmm(self._bias_rows[layer][prev_layers], z, self._cls_t).softmax(-1)[0].tolist()

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
                candidates = torch.tensor(stay, device=h.device)
                head_logits = self.exit_logits(layer, h[candidates], model)
                sure = self.confident(layer, head_logits)
                exits = [i for i, ok in zip(stay, sure) if ok]
                confident_logits = head_logits[torch.tensor(sure, dtype=torch.bool, device=h.device)]
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
