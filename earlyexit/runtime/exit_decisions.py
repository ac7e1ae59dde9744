"""Where and how an early-exit policy decides, for the newest token after a block: continue, exit or stop.

`ExitDecisions` holds what the decode loops of `earlyexit.runtime.policies.EarlyExit` ask: whether anything is
decided after a block (`asks`, `exits_at`, `stops_at`), the block's last residual add fused with the controller's
classifier (`check`, `check_rows`, through `earlyexit.kernels.layer_check`), the decision from its probabilities
(`decide`, `stops`, `lean_probs`), the exit head's confidence (`confident`) and an exiting token's logits
(`exit_logits`). The decode loops and the state copy stay with the policy.

Two rules decide an exit. "controller": the controller's p(exit) above `thresholds.exit` (the study's rule).
"confidence": the exit head's own max probability at least the layer's threshold (`check_confidence`), asked at the
layers those thresholds name; the controller still decides stops. `check_exit_layers` and `check_confidence` validate what `EarlyExit` is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EarlyExitError
from .heads import EXIT, STOP, ExitHeads, Thresholds
from .model import GPT2

EXIT_RULES = ("auto", "controller", "confidence")


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


def _reranked_exit_head(model: GPT2, exit_head: str):
    """The int8 vocabulary projection an exiting token takes its logits from, or None for the model's own head.

    The int8 copy's top 8 are recomputed in fp32 (the fp32 head's argmax whenever its winner is among them): on a CPU
    the head is most of what an exit still reads. Tokens that run every block keep the model's own head, so with exits
    off the tokens are full's.
    """
    from .quantize import RerankedHead

    if exit_head not in ("auto", "int8", "fp32"):
        raise EarlyExitError(f"exit_head must be auto, int8 or fp32, got {exit_head!r}")
    if exit_head == "int8" and not RerankedHead.supports(model):
        raise EarlyExitError("exit_head='int8' needs an fp32 GPT2 whose width the int8 op takes (a multiple of 16)")
    fast = exit_head == "int8" or (exit_head == "auto" and RerankedHead.supports(model) and model.device.type == "cpu")
    return RerankedHead(model.head_weight) if fast else None


def _confidence_thresholds(model: GPT2, heads: ExitHeads, exit_rule: str, confidence, exit_layers) -> dict[int, float] | None:
    """The per-layer confidence thresholds of the confidence rule, or None where the controller decides exits.

    At 99% agreement the head's confidence lets 4-7x more tokens leave after blocks 9-11 of the default model than
    p(exit) (experiments/results/exit_signals). "auto": confidence where the heads carry calibrated thresholds.
    """
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
        return None
    if exit_rule == "confidence" and confidence is None and calibrated is None:
        raise EarlyExitError("these exit heads carry no confidence thresholds: run python -m earlyexit.training.confidence_rule, "
                             "or give confidence=")
    L = heads.cfg.n_layer
    default_layers = ([int(k) for k in calibrated] if calibrated else
                      sorted(exit_layers) if exit_layers is not None else range(L - 1))
    return check_confidence(confidence if confidence is not None else calibrated, L, default_layers)


class ExitDecisions:
    """The decision side of `EarlyExit` over exit heads: thresholds, where to ask, the controller's check and the rule
    that turns its probabilities (or the exit head's confidence) into continue, exit or stop."""

    def __init__(self, model: GPT2, heads: ExitHeads, thresholds: Thresholds | None = None, kernel_backend: str = "auto",
                 exit_layers=None, exit_head: str = "auto", exit_rule: str = "auto", confidence=None):
        if not isinstance(heads, ExitHeads):
            raise EarlyExitError(f"EarlyExit needs ExitHeads (earlyexit.runtime.heads.load_heads), got {type(heads).__name__}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise EarlyExitError(f"thresholds must be a Thresholds(exit=..., stop=...), got {type(thresholds).__name__} {thresholds!r}")
        self.heads = heads
        self.thresholds = thresholds or heads.cfg.thresholds
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
        self.exit_head = _reranked_exit_head(model, exit_head)
        self._cls_t = heads.cls.weight.detach().float().t()  # (d, 3): layer_check_reference's operand, as a view
        # thresholds.exit < 1 stays the switch that turns exits on, under either rule
        self.confidence = _confidence_thresholds(model, heads, exit_rule, confidence, self.exit_layers)
        self.exit_rule = "confidence" if self.confidence is not None else "controller"
        self._native_controllers = {}  # (thresholds, exit layers, stops only) -> csrc's Controller (native_controller)

    def native_controller(self, n_layer: int, stops_only: bool = False):
        """The heads as csrc's `Controller` for the thresholds as they are now (built once per thresholds): the
        controller asked where `asks` and a stop or a controller exit can be decided, the exit heads' confidence where
        the confidence rule has a threshold; None where the native step is not built. stops_only: asked only where
        `stops_at` (lossless mode's stop check), no confidence exits."""
        key = (self.thresholds.exit, self.thresholds.stop, self.exit_layers, stops_only)
        if key not in self._native_controllers:
            from .native import controller

            L = n_layer
            if stops_only:
                checks, confidence = [self.stops_at(i, L) for i in range(L)], {}
            else:
                checks = [self.asks(i, L) and (self.stops_at(i, L) or self.controller_exits(i, L)) for i in range(L)]
                confidence = {i: t for i, t in (self.confidence or {}).items() if self.exits_at(i, L)}
            self._native_controllers[key] = controller(self.heads, self.bias_table, checks, [self.controller_exits(i, L) for i in range(L)],
                                                       self.thresholds.exit, self.thresholds.stop, confidence, self.exit_head)
        return self._native_controllers[key]

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

    def confident_exit(self, layer: int, h: torch.Tensor, model: GPT2, kernel: bool = True) -> tuple[list[bool], torch.Tensor]:
        """The confidence rule after block `layer` for rows h (B, d): per row whether it leaves, and the exit logits
        (leaving rows, V) of the rows that leave, in order.

        On the Triton backend (a GPU, or `kernel_backend="triton"`) the fused exit_confidence kernel streams the head
        once for the max probability and never writes the logits of the rows that stay (most of them); elsewhere the
        head's logits are computed once and serve both the test and the rows that leave (and always with
        `kernel=False`: the lean single-token step, a CPU path).
        """
        from ..kernels.dispatch import exit_confidence
        from .quantize import Int8GPT2

        fused = (kernel and self.exit_head is None and not isinstance(model, Int8GPT2)
                 and (self.kernel_backend == "triton" or (self.kernel_backend == "auto" and h.is_cuda)))
        if fused:
            z = self.heads.head_hidden(layer, h)  # (B, d): LN_l + adapter, what the tied head projects
            top = exit_confidence(z, None, None, model.head_weight, backend=self.kernel_backend).max_prob
            sure = (top.double() >= self.confidence[layer]).tolist()
            return sure, model.project(z[torch.tensor(sure, dtype=torch.bool, device=h.device)])
        logits = self.exit_logits(layer, h, model)
        sure = self.confident(layer, logits)
        return sure, logits if all(sure) else logits[torch.tensor(sure, dtype=torch.bool, device=h.device)]

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

    def lean_probs(self, layer: int, h: torch.Tensor, prev_layers: int) -> list[float]:
        """The action probabilities after block `layer` for one fp32 row h (1, d), as `layer_check_reference` computes
        them (the same ops on the same operands, so the same floats), brought to the host: the layer's one sync."""
        ln = self.heads.cls_ln
        z = F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, ln.eps)
        return torch.addmm(self._bias_rows[layer][prev_layers], z, self._cls_t).softmax(-1)[0].tolist()
