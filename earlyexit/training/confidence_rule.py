"""Calibrate the confidence rule: where a token may leave, and how sure its exit head must be there.

    python -m earlyexit.training.confidence_rule [--model DIR] [--config configs/confidence_rule.yaml] [key=value ...]

Under the confidence rule (`EarlyExit(exit_rule="confidence")`) a token leaves after block l when the exit head
there gives its own token a probability of at least τ_l; the controller still decides stops. The head's confidence
predicts agreement with the full model far better than the controller's p(exit) on the default model
(experiments/exit_signals.py), but a check now costs an exit head, so it pays at few layers. This chooses them:

1. *Teacher-forced* on validation windows (half of them fit, half score): every block's output, each exit head's
   logits through the runtime's own exit path (`EarlyExit.exit_logits`: on a CPU the int8 head with the top 8
   re-scored in fp32, so the probabilities are the ones decoding compares), their max probability, and whether
   their token is the full model's.
2. *Thresholds in cascade order*: for a set of asked layers, the lowest τ at each layer, in order, such that the
   tokens still there that would leave agree with the full model at `target` (those that left earlier are gone,
   so a later layer's threshold is set on the harder tokens that reach it).
3. *Asked layers by expected cost*: the piece costs `earlyexit.training.exit_layers` measured on this machine (stored
   in the heads' config; measured now where missing); greedy forward selection on the fitting half, the layer that
   lowers the expected ms per token most first, while one does; the choice is then scored on the other half.

Written into the heads' config (`exit_confidence`, and the tables under `calibration.confidence_rule`; with
`weights=int8`, over the int8 copy `--weights int8` runs: `exit_confidence_int8`, `{}` where no exit pays), so decoding
uses it by default (`--exit-rule auto`). Teacher forcing gives every earlier token full-depth K/V; the benchmark
measures real decoding.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import torch

from ..config import config_parser, exit_code, load_config
from ..errors import EarlyExitError


@dataclass
class ConfidenceRuleConfig:
    windows: int = 96  # validation windows: the first half fits the thresholds and the choice, the second scores it
    window_tokens: int = 256
    target: float = 0.99  # agreement with the full model of the tokens that leave at each asked layer
    timing_rounds: int = 200  # only where the heads carry no measured piece costs
    threads: int = 0  # 0: all cores
    seed: int = 0
    write: bool = True  # write the thresholds into the heads' config
    weights: str = "fp32"  # whose exits: the fp32 model's (exit_confidence) or the int8 copy's (exit_confidence_int8)

    def __post_init__(self):
        if self.weights not in ("fp32", "int8"):
            raise EarlyExitError(f"weights must be fp32 or int8, got {self.weights!r}")
        if self.windows < 2 or self.window_tokens < 2 or self.timing_rounds < 1:
            raise EarlyExitError("windows and window_tokens must be >= 2, timing_rounds >= 1")
        if not 0 < self.target <= 1:
            raise EarlyExitError(f"target must be in (0, 1], got {self.target!r}")


def best_threshold(score: torch.Tensor, hits: torch.Tensor, target: float) -> tuple[float, float]:
    """(threshold, share of tokens at or above it): the largest share whose `hits` rate is >= target (inf, 0: none)."""
    order = torch.argsort(score, descending=True)
    ordered = hits[order].double()
    precision = ordered.cumsum(0) / torch.arange(1, len(ordered) + 1)
    ok = (precision >= target).nonzero()
    if not len(ok):
        return float("inf"), 0.0
    k = int(ok.max())
    return float(score[order][k]), (k + 1) / len(ordered)


def cascade_thresholds(max_prob: torch.Tensor, agree: torch.Tensor, asked: list[int], target: float) -> dict[int, float]:
    """τ for each asked layer (0-based, in order), set on the tokens that reach it: max_prob, agree (L - 1, N)."""
    alive = torch.ones(max_prob.shape[1], dtype=torch.bool)
    out = {}
    for layer in sorted(asked):
        tau, _ = best_threshold(max_prob[layer, alive], agree[layer, alive], target) if alive.any() else (float("inf"), 0.0)
        out[layer] = tau
        alive &= max_prob[layer] < tau
    return out


def simulate(max_prob: torch.Tensor, agree: torch.Tensor, thresholds: dict[int, float], costs, n_layer: int) -> dict:
    """Expected ms per token, mean depth and agreement with the full model of the rule `thresholds` on these tokens."""
    n = max_prob.shape[1]
    alive, depth = torch.ones(n, dtype=torch.bool), torch.full((n,), float(n_layer))
    agreed, paid = torch.ones(n, dtype=torch.bool), torch.zeros(n)
    for layer in sorted(thresholds):
        paid += alive * costs.exit_head  # the head is the check; a token that leaves uses its logits
        leave = alive & (max_prob[layer] >= thresholds[layer])
        depth[leave], agreed[leave] = layer + 1, agree[layer, leave]
        alive &= ~leave
    ms = paid + depth * costs.block + (n_layer - depth) * costs.fill + alive * costs.final_head
    full = n_layer * costs.block + costs.final_head
    return {"asked": [layer + 1 for layer in sorted(thresholds)], "thresholds": [thresholds[k] for k in sorted(thresholds)],
            "ms_per_token": float(ms.mean()), "speedup_vs_full": full / float(ms.mean()), "mean_layers": float(depth.mean()),
            "agreement": float(agreed.float().mean())}


def choose(max_prob: torch.Tensor, agree: torch.Tensor, costs, n_layer: int, target: float) -> tuple[dict[int, float], list[dict]]:
    """Asked layers by expected ms per token (greedy forward selection, as the controller's); their thresholds and
    every step's estimate."""
    from .exit_layers import greedy_layers

    def estimate(asked: list[int]) -> dict:
        return simulate(max_prob, agree, cascade_thresholds(max_prob, agree, asked, target), costs, n_layer)

    asked, steps = greedy_layers(n_layer, estimate)
    return cascade_thresholds(max_prob, agree, asked, target), steps


@torch.no_grad()
def teacher_forced(model, policy, windows: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_prob, agree), each (L - 1, N) over the windows' tokens in order, through `policy.exit_logits`."""
    from .layer_outputs import layer_states

    L = model.dims.n_layer
    probs, agrees = [], []
    for start in range(0, len(windows), chunk):
        states = layer_states(model, windows[start:start + chunk], bf16=False)
        full = model.logits(states[-1]).argmax(-1).flatten()
        p, a = [], []
        for layer in range(L - 1):
            logits = policy.exit_logits(layer, states[layer].flatten(0, 1), model).float()
            p.append(logits.softmax(-1).amax(-1))
            a.append(logits.argmax(-1) == full)
        probs.append(torch.stack(p))
        agrees.append(torch.stack(a))
    return torch.cat(probs, dim=1), torch.cat(agrees, dim=1)


def calibrate_confidence(model_dir: str | None, cfg: ConfidenceRuleConfig) -> dict:
    from ..data.corpus import model_corpus
    from ..runtime.heads import load_heads
    from ..runtime.loading import load_runtime_model, resolve_model_dir
    from ..runtime.policies import EarlyExit
    from .exit_layers import PieceCosts, measure_costs
    from .layer_outputs import tokenize_until

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    directory = resolve_model_dir(model_dir)
    model, tok = load_runtime_model(directory)
    heads = load_heads(directory, model)
    if cfg.weights == "int8":  # the int8 copy's own exits: its blocks, its heads, its costs, agreement with its own tokens
        from ..runtime.quantize import quantize_int8

        model = quantize_int8(model)
    policy = EarlyExit(model, heads, exit_rule="controller")  # its exit path; the rule does not matter here
    stored = heads.cfg.calibration.get("exit_layers", {}).get("costs_ms") if cfg.weights == "fp32" else None
    if stored:
        costs = PieceCosts(**stored)
    else:
        costs = measure_costs(model, EarlyExit(model, heads, exit_layers="all", exit_rule="controller"), cfg.timing_rounds)
    files = model_corpus(directory)[0]["validation"]
    width = min(cfg.window_tokens, model.dims.n_positions)
    tokens = torch.as_tensor(tokenize_until(files, tok, cfg.windows * width, cfg.seed)[: cfg.windows * width])
    windows = tokens[: len(tokens) // width * width].view(-1, width)
    half = len(windows) // 2 * width
    max_prob, agree = teacher_forced(model, policy, windows)
    L = model.dims.n_layer
    thresholds, steps = choose(max_prob[:, :half], agree[:, :half], costs, L, cfg.target)
    scored = simulate(max_prob[:, half:], agree[:, half:], thresholds, costs, L)
    result = {"chosen": {str(k): v for k, v in thresholds.items()}, "scored": scored, "selection": steps, "target": cfg.target,
              "costs_ms": asdict(costs), "costs_origin": "exit_layers" if stored else "measured", "tokens": int(max_prob.shape[1]),
              "split": "validation", "config": asdict(cfg)}
    if cfg.write:  # {}: calibrated, and no exit pays
        field = "exit_confidence" if cfg.weights == "fp32" else "exit_confidence_int8"
        setattr(heads.cfg, field, result["chosen"])
        key = "confidence_rule" if cfg.weights == "fp32" else "confidence_rule_int8"
        heads.cfg.calibration = {**heads.cfg.calibration, key: result}
        heads.save_config(directory)
    return result


def report(result: dict) -> str:
    s = result["scored"]
    chosen = ", ".join(f"after block {int(k) + 1}: p >= {v:.3f}" for k, v in result["chosen"].items()) or "none (no exit pays)"
    return (f"confidence rule at agreement {result['target']:g} per asked layer: {chosen}\n"
            f"on the scoring half ({result['tokens'] // 2:,} tokens): {s['ms_per_token']:.2f} ms/token expected, "
            f"{s['speedup_vs_full']:.3f}x full, {s['mean_layers']:.2f} layers, {s['agreement']:.2%} of tokens the full model's")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], ConfidenceRuleConfig)
    parser.add_argument("--model", help="GPT-2 checkpoint directory with exit heads (default: the embedded model)")
    args = parser.parse_args(argv)
    return exit_code(lambda: print(report(calibrate_confidence(args.model, load_config(ConfidenceRuleConfig, args.config, args.overrides)))))


if __name__ == "__main__":
    sys.exit(main())
