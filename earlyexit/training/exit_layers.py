"""Choose the layers where the controller is asked: where an exit saves more than the checks cost.

    python -m earlyexit.training.exit_layers [--model DIR] [--config configs/exit_layers.yaml] [key=value ...]

The study asks the controller after every block. On a CPU at batch 1 a check is a layer
norm, a (d, 3) projection, a softmax and a host sync: a few percent of a block, paid at
every asked layer by every token that has not left yet, while an exit at a layer where
the controller rarely trusts the hidden state saves almost nothing. So the asked layers
are chosen, by expected cost per token on this machine:

1. *What the controller would do* (teacher-forced, validation split): every block's
   output for `windows` windows of held-out code, the controller's decision at every
   layer for every value of its previous-exit feature (the previous token's depth
   depends on the layers asked, so it is simulated, not fixed), and whether the exit
   head there agrees with the full model.
2. *What each piece costs* (measured here, on the lean single-token path decoding uses; on the
   native step a token's blocks and checks are one call, so a check is what it adds to that call):
   one block, one check, one skipped block's state copy, an exit head and the final head,
   each from whole tokens timed with and without it (a piece timed alone in a loop keeps
   its weights in cache: on this CPU a block then looks ~2x cheaper than inside a token).
3. *The expected cost of a set of asked layers*: tokens walk through their windows in
   order, each leaving at the first asked layer whose decision (given the previous
   token's simulated depth) is exit, paying the blocks it ran, the checks it was asked,
   the state copies of the blocks it skipped and its head. Layers are added greedily,
   the one that lowers the cost most first, while one still does.

The choice is written into the heads' config (`exit_heads.json`: `exit_layers`, and the
table behind it under `calibration.exit_layers`), so decoding uses it by default. It is
an estimate: teacher forcing gives every earlier token full-depth K/V, where real decoding
gives skipped layers state-copied ones; `calibrate` and the benchmark measure real decoding.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..config import config_parser, exit_code, load_config
from ..errors import EarlyExitError
from ..runtime.heads import EXIT, ExitHeads
from ..runtime.model import GPT2


@dataclass
class ExitLayersConfig:
    windows: int = 16  # validation windows the controller is simulated on
    window_tokens: int = 256
    timing_rounds: int = 200  # tokens timed per piece and round (median)
    threads: int = 0  # 0: all cores
    seed: int = 0
    weights: str = "fp32"  # the costs of which lean path: fp32, or the int8 copy `--weights int8` runs
    write: bool = True  # write the choice into the heads' config

    def __post_init__(self):
        if self.weights not in ("fp32", "int8"):
            raise EarlyExitError(f"weights must be fp32 or int8, got {self.weights!r}")
        if self.windows < 1 or self.window_tokens < 2 or self.timing_rounds < 1:
            raise EarlyExitError("windows and timing_rounds must be >= 1, window_tokens >= 2")


@dataclass
class PieceCosts:
    """Milliseconds per call on the lean single-token path."""

    block: float
    check: float
    fill: float  # one skipped block's state copy
    exit_head: float
    final_head: float


@torch.no_grad()
def decision_table(model: GPT2, heads: ExitHeads, windows: torch.Tensor, threshold: float) -> tuple[list, list]:
    """Per token (windows flattened in order): `exits[t][l][p]` whether the controller exits after block l when the
    previous token ran p blocks (p = 0: no previous token), and `agrees[t][l]` whether head l's token is the full
    model's. Both for l < L - 1."""
    from .layer_outputs import layer_predictions, layer_states

    L = model.dims.n_layer
    states = layer_states(model, windows, bf16=False)  # L x (B, T, d)
    preds = layer_predictions(heads, model, states)  # (L, B, T)
    agrees = (preds[:-1] == preds[-1][None]).flatten(1).t()  # (N, L - 1)
    prev = torch.arange(L + 1)
    exits = []
    for layer in range(L - 1):
        base = heads.cls(heads.cls_ln(states[layer])).flatten(0, 1)  # (N, 3)
        logits = base[:, None] + heads.extra_bias(layer, prev)[None]  # (N, L + 1, 3)
        probs = logits.float().softmax(-1)
        exits.append((probs.argmax(-1) == EXIT) & (probs[..., EXIT].double() > threshold))  # (N, L + 1)
    return torch.stack(exits, dim=1).tolist(), agrees.tolist()  # (N, L - 1, L + 1), (N, L - 1)


def simulate(exits: list, agrees: list, asked: list[int], costs: PieceCosts, n_layer: int, windows: int) -> dict:
    """Expected ms per token, mean depth and agreement when the controller is asked after the blocks `asked`."""
    asked = sorted(asked)
    per_window = len(exits) // windows
    total = depth = agreed = 0.0
    prev = 0
    for t, (row, agree_row) in enumerate(zip(exits, agrees)):
        if t % per_window == 0:
            prev = 0  # a new window: no previous token
        leave, checks = n_layer - 1, 0
        for layer in asked:
            checks += 1
            if row[layer][prev]:
                leave = layer
                break
        ran = leave + 1
        exited = ran < n_layer
        total += ran * costs.block + checks * costs.check + (n_layer - ran) * costs.fill
        total += costs.exit_head if exited else costs.final_head
        depth += ran
        agreed += agree_row[leave] if exited else 1
        prev = ran
    n = len(exits)
    return {"asked": [layer + 1 for layer in asked], "ms_per_token": total / n, "mean_layers": depth / n, "agreement": agreed / n}


def greedy_layers(n_layer: int, estimate) -> tuple[list[int], list[dict]]:
    """Greedy forward selection of asked layers (0-based, below the last): from none, add the layer whose
    `estimate(asked)` (a dict with "ms_per_token") is lowest, while that lowers it. The choice and each step's estimate."""
    asked: list[int] = []
    steps = [estimate(asked)]
    while True:
        trials = [(estimate(asked + [layer]), layer) for layer in range(n_layer - 1) if layer not in asked]
        if not trials:
            break
        best, layer = min(trials, key=lambda trial: trial[0]["ms_per_token"])
        if best["ms_per_token"] >= steps[-1]["ms_per_token"]:
            break
        asked.append(layer)
        steps.append(best)
    return sorted(asked), steps


def choose(exits: list, agrees: list, costs: PieceCosts, n_layer: int, windows: int) -> tuple[list[int], list[dict]]:
    """The controller's asked layers by expected cost; returns the choice and every step's estimate."""
    return greedy_layers(n_layer, lambda asked: simulate(exits, agrees, asked, costs, n_layer, windows))


def native_checks(model: GPT2, policy) -> dict | None:
    """Controllers that never exit or stop, for timing tokens on the native step the way early exit decodes them
    (one call: blocks, checks, head): "none" checks nothing, "every" asks the controller after every block,
    "head" computes the exit head after block L // 2; None where the model's lean step is not native."""
    from ..runtime import native

    if not hasattr(model.lean, "built") or model.lean.built() is None:  # built on first use: now, if not yet
        return None
    L = model.dims.n_layer

    def build(check, confidence=None):
        return native.controller(policy.heads, policy.bias_table, [check] * L, [False] * L, 1.0, 1.0, confidence, policy.exit_head)

    built = {"none": build(False), "every": build(True), "head": build(False, {L // 2: 2.0})}  # 2.0: never confident
    return None if None in built.values() else built


def _timed_rounds(steps: dict, rounds: int, first: int) -> dict[str, float]:
    """Median ms of each step, the steps taking turns token by token at advancing positions (each call streams the
    weights the one before it read, as decoding does; a drift in the machine's speed touches every piece alike), in a
    new random order every token (what ran just before a step changes which weights are still in cache: a fixed order
    flattered the step after the state copies by ~0.5 ms)."""
    for step in steps.values():
        step(first)  # warm-up
    times = {name: [] for name in steps}
    order, rng = list(steps), random.Random(0)
    for i in range(3 * rounds):
        rng.shuffle(order)
        for name in order:
            step = steps[name]
            t0 = time.perf_counter()
            step(first + 1 + i % rounds)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


@torch.inference_mode()
def measure_costs(model: GPT2, policy, rounds: int) -> PieceCosts:
    """The pieces of an early-exit token on the model's lean path, from whole tokens timed with and without each piece
    (on the native step, tokens as early exit decodes them: one call each, the checks and heads inside)."""
    lean = model.lean
    if lean is None:
        raise EarlyExitError("this model has no lean single-token path to time (an fp32 GPT2 from load_runtime_model, or an int8 copy)")
    L, first = model.dims.n_layer, 16
    rounds = min(rounds, model.dims.n_positions - first - 2)
    cache = model.new_cache(1, model.dims.n_positions)
    native = native_checks(model, policy)

    def blocks(pos, check=False):
        x = lean.embed(1, pos)
        if not check:
            return lean.blocks(0, L, x, cache, pos)
        for layer in range(L):
            x = lean.block(layer, x, cache, pos)
            policy.lean_probs(layer, x, 0)
        return x

    def filled(pos):  # every block, then every block's state copy too: each copy reads weights a block evicted
        x = blocks(pos)
        for layer in range(1, L):
            lean.fill_kv(layer, x, cache, pos)
        return lean.final_logits(x)

    steps = {"blocks": blocks, "full": lambda pos: lean.final_logits(blocks(pos)), "filled": filled}  # full: full mode's head
    if native is None:
        steps |= {"checked": lambda pos: blocks(pos, check=True), "exit": lambda pos: policy.exit_logits(L // 2, blocks(pos), model)}
    else:
        steps |= {name: (lambda c: lambda pos: lean.decide(1, cache, pos, 0, c))(c) for name, c in native.items()}
    t = _timed_rounds(steps, rounds, first)
    if native is not None:  # decide runs the final head too: each piece is what it adds to that token
        t["checked"], t["exit"] = t["blocks"] + t["every"] - t["none"], t["blocks"] + t["head"] - t["none"]
    return PieceCosts(block=t["blocks"] / L, check=max(0.0, (t["checked"] - t["blocks"]) / L), fill=max(0.0, (t["filled"] - t["full"]) / (L - 1)),
                      exit_head=max(0.0, t["exit"] - t["blocks"]), final_head=max(0.0, t["full"] - t["blocks"]))


def choose_exit_layers(model_dir: str | None, cfg: ExitLayersConfig) -> dict:
    from ..data.corpus import model_corpus
    from ..runtime.heads import load_heads
    from ..runtime.loading import load_runtime_model, resolve_model_dir
    from ..runtime.policies import EarlyExit
    from .layer_outputs import tokenize_until

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    directory = resolve_model_dir(model_dir)
    model, tok = load_runtime_model(directory)
    heads = load_heads(directory, model)
    threshold = heads.cfg.thresholds.exit
    if threshold >= 1:
        raise EarlyExitError(f"the heads in {directory} have exits off (exit threshold {threshold:g}): calibrate them first")
    files = model_corpus(directory)[0]["validation"]
    width = min(cfg.window_tokens, model.dims.n_positions)
    tokens = torch.as_tensor(tokenize_until(files, tok, cfg.windows * width, cfg.seed)[: cfg.windows * width])
    windows = tokens[: len(tokens) // width * width].view(-1, width)
    exits, agrees = decision_table(model, heads, windows, threshold)
    timed = model
    if cfg.weights == "int8":
        from ..runtime.quantize import quantize_int8

        timed = quantize_int8(model)
    costs = measure_costs(timed, EarlyExit(timed, heads, exit_layers="all", exit_rule="controller"), cfg.timing_rounds)
    L = model.dims.n_layer
    chosen, steps = choose(exits, agrees, costs, L, len(windows))
    every = simulate(exits, agrees, list(range(L - 1)), costs, L, len(windows))
    result = {"chosen": [layer + 1 for layer in chosen], "threshold": threshold, "weights": cfg.weights, "costs_ms": asdict(costs),
              "selection": steps, "every_layer": every, "tokens": len(exits), "split": "validation", "config": asdict(cfg)}
    if cfg.write:
        heads.cfg.exit_layers = chosen
        heads.cfg.calibration = {**heads.cfg.calibration, "exit_layers": result}
        heads.save_config(directory)
    return result


def report(result: dict) -> str:
    c = result["costs_ms"]
    lines = [f"measured ms: block {c['block']:.3f}, check {c['check']:.3f}, state copy {c['fill']:.3f}, "
             f"exit head {c['exit_head']:.3f}, final head {c['final_head']:.3f}",
             f"expected per token over {result['tokens']:,} validation tokens at exit threshold {result['threshold']:g}:",
             "asked after blocks                   ms/token  mean layers  agreement"]
    rows = [("none (full depth)", result["selection"][0])]
    rows += [(",".join(map(str, step["asked"])), step) for step in result["selection"][1:]]
    rows.append(("every block (the study)", result["every_layer"]))
    for label, step in rows:
        lines.append(f"{label:<36} {step['ms_per_token']:>8.3f}  {step['mean_layers']:>11.2f}  {step['agreement']:>9.2%}")
    chosen = ",".join(map(str, result["chosen"])) or "none"
    lines.append(f"chosen: ask after blocks {chosen}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], ExitLayersConfig)
    parser.add_argument("--model", help="GPT-2 checkpoint directory with calibrated exit heads (default: the embedded model)")

    def run():
        print(report(choose_exit_layers(args.model, load_config(ExitLayersConfig, args.config, args.overrides))))

    args = parser.parse_args(argv)
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExitLayersConfig", "PieceCosts", "choose", "greedy_layers", "choose_exit_layers", "decision_table", "simulate"]
