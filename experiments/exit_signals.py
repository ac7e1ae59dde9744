"""Which signal should decide an exit? The learned controller against the exit head's own confidence, measured.

    python experiments/exit_signals.py [--model DIR ...] [--windows 96] [--window-tokens 256] [--targets 0.99,0.98]

Teacher-forced on validation windows (the split `calibrate` and `exit_layers` use), for every layer below the last:
whether its exit head's token is the full model's ("agrees"), and four scores that could predict it: the controller's
p(exit) (its previous-exit feature from the full model's agreement at the previous position, as `train_heads` trains
it), the exit head's max probability and its top-2 margin, and a logistic probe (per layer, on the controller's
normalised hidden state plus both confidences) fitted on the first half of the windows. Everything is scored on the
second half.

1. *Exitable at a precision*: the largest share of tokens that can leave at a layer while the tokens that leave there
   agree with the full model at the target rate (the best threshold, chosen on the scored half itself: a ceiling).
2. *What a rule would cost per token* on this machine's lean path (piece costs measured by
   `earlyexit.training.exit_layers`, stored in the heads' config, else measured now): the confidence rule at each set
   of asked layers, thresholds chosen on the first half in cascade order for the target precision
   (`earlyexit.training.confidence_rule`, which calibrates the runtime's) and applied to the second;
   beside it the controller at its calibrated threshold on its asked layers, simulated as `exit_layers` does.
   A confidence check runs the exit head (int8, top 8 re-scored in fp32); its logits are the exit's, so a token that
   leaves pays nothing more, and one that goes on has paid the head for nothing.

Writes experiments/results/exit_signals/ (results.json, results.md, exitable.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_results  # noqa: E402

from earlyexit.training.confidence_rule import best_threshold, cascade_thresholds, simulate  # noqa: E402

SIGNALS = ("controller", "max_prob", "margin", "probe")
ASKED_SETS = ([11], [10], [9], [10, 11], [9, 10], [9, 10, 11], [8, 9, 10, 11], [6, 9, 11])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="checkpoint directory with exit heads (repeatable; default: the embedded model)")
    p.add_argument("--windows", type=int, default=96, help="validation windows (an even number: half fit, half scored)")
    p.add_argument("--window-tokens", type=int, default=256)
    p.add_argument("--targets", default="0.99,0.98", help="comma-separated precisions (agreement of the tokens that exit)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def layer_signals(model, heads, windows: torch.Tensor, chunk: int = 16) -> dict:
    """Per layer (L, B, T): agreement with the last layer, the controller's p(exit), the head's max-prob and margin;
    and the controller's normalised hidden states (L, B, T, d) the probe reads."""
    from earlyexit.runtime.heads import EXIT
    from earlyexit.training.train_heads import layer_states, previous_exit_layers

    preds, max_prob, margin, states = [], [], [], []
    for start in range(0, len(windows), chunk):
        P, M, G, S = [], [], [], []
        for layer, h in enumerate(layer_states(model, windows[start:start + chunk], bf16=False)):
            logits = heads.head_logits(layer, h, model).float()
            top = logits.softmax(-1).topk(2, dim=-1).values
            P.append(logits.argmax(-1))
            M.append(top[..., 0])
            G.append(top[..., 0] - top[..., 1])
            S.append(heads.cls_ln(h))
        for out, rows in ((preds, P), (max_prob, M), (margin, G), (states, S)):
            out.append(torch.stack(rows))
    preds, max_prob, margin, states = (torch.cat(x, dim=1) for x in (preds, max_prob, margin, states))
    prev = previous_exit_layers(preds)
    controller = torch.stack([(heads.cls(states[layer]) + heads.extra_bias(layer, prev)).float().softmax(-1)[..., EXIT]
                              for layer in range(len(states))])
    return {"agree": preds == preds[-1][None], "controller": controller, "max_prob": max_prob, "margin": margin, "states": states}


def fit_probe(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (L-BFGS, a little L2) of y (N,) on x (N, k)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y.float()) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_scores(sig: dict, half: int) -> torch.Tensor:
    """Each layer's probe, fitted on windows [:half], scored on [half:]: (L, B - half, T)."""
    out = []
    for layer in range(sig["agree"].shape[0]):
        def features(part):
            return torch.cat([sig["states"][layer, part].flatten(0, 1), sig["max_prob"][layer, part].flatten()[:, None],
                              sig["margin"][layer, part].flatten()[:, None]], dim=1)

        w, b = fit_probe(features(slice(0, half)), sig["agree"][layer, :half].flatten())
        out.append((features(slice(half, None)) @ w + b).view(sig["agree"][layer, half:].shape))
    return torch.stack(out)


def confidence_rule(sig: dict, half: int, asked: list[int], target: float, costs) -> dict:
    """The max-prob rule at 0-based `asked` layers: thresholds set on windows [:half] in cascade order for `target`
    (earlyexit.training.confidence_rule, fp32 heads here), applied to [half:]."""
    flat = {k: sig[k].flatten(1, 2) for k in ("max_prob", "agree")}
    n = half * sig["agree"].shape[2]
    thresholds = cascade_thresholds(flat["max_prob"][:, :n], flat["agree"][:, :n], asked, target)
    r = simulate(flat["max_prob"][:, n:], flat["agree"][:, n:], thresholds, costs, sig["agree"].shape[0])
    return {"rule": "max_prob", "target": target, **r}


def controller_rule(model, heads, windows: torch.Tensor, costs) -> dict:
    """The shipped controller at its calibrated threshold and asked layers (exit_layers' simulation)."""
    from earlyexit.training.exit_layers import decision_table, simulate

    L = model.dims.n_layer
    exits, agrees = decision_table(model, heads, windows, heads.cfg.thresholds.exit)
    asked = list(range(L - 1)) if heads.cfg.exit_layers is None else sorted(heads.cfg.exit_layers)
    r = simulate(exits, agrees, asked, costs, L, len(windows))
    full = L * costs.block + costs.final_head
    return {"rule": f"controller (exit {heads.cfg.thresholds.exit:g})", **r, "target": None,
            "speedup_vs_full": full / r["ms_per_token"]}


def piece_costs(model, heads, directory):
    from earlyexit.runtime.policies import EarlyExit
    from earlyexit.training.exit_layers import PieceCosts, measure_costs

    stored = heads.cfg.calibration.get("exit_layers", {}).get("costs_ms")
    if stored:
        return PieceCosts(**stored), "stored by earlyexit.training.exit_layers"
    return measure_costs(model, EarlyExit(model, heads, exit_layers="all", exit_rule="controller"), 200), "measured now"


def study(directory, args, targets: list[float]) -> dict:
    from earlyexit.data.corpus import model_corpus
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import load_runtime_model
    from earlyexit.training.train_heads import tokenize_until

    model, tok = load_runtime_model(directory)
    heads = load_heads(directory, model)
    width = min(args.window_tokens, model.dims.n_positions)
    files = model_corpus(directory)[0]["validation"]
    tokens = torch.as_tensor(tokenize_until(files, tok, args.windows * width, args.seed)[: args.windows * width])
    windows = tokens[: len(tokens) // width * width].view(-1, width)
    half = len(windows) // 2
    sig = layer_signals(model, heads, windows)
    scores = {"controller": sig["controller"][:, half:], "max_prob": sig["max_prob"][:, half:], "margin": sig["margin"][:, half:],
              "probe": probe_scores(sig, half)}
    L = model.dims.n_layer
    exitable = {f"{t:g}": {name: [best_threshold(scores[name][layer].flatten(), sig["agree"][layer, half:].flatten(), t)[1]
                                  for layer in range(L - 1)] for name in SIGNALS} for t in targets}
    costs, origin = piece_costs(model, heads, directory)
    rules = [controller_rule(model, heads, windows[half:], costs)]
    rules += [confidence_rule(sig, half, [a - 1 for a in asked], t, costs) for t in targets for asked in ASKED_SETS if max(asked) < L]
    return {"model": str(directory), "n_layer": L, "tokens_scored": int(sig["agree"][0, half:].numel()),
            "agreement_by_layer": sig["agree"][:-1, half:].float().mean(dim=(1, 2)).tolist(), "exitable": exitable,
            "costs_ms": vars(costs), "costs_origin": origin, "rules": rules}


def render(results: list[dict], targets: list[float]) -> str:
    lines = []
    for r in results:
        L = r["n_layer"]
        lines += [f"## `{r['model']}`", "", f"{r['tokens_scored']:,} validation tokens scored (teacher-forced).", "",
                  f"Share of tokens that can exit at each layer with agreement >= {targets[0]:g} among them (the best threshold "
                  "for each signal, a ceiling):", "",
                  "| layer | agrees with last | " + " | ".join(SIGNALS) + " |", "|---|---|" + "---|" * len(SIGNALS)]
        ex = r["exitable"][f"{targets[0]:g}"]
        for layer in range(L - 1):
            lines.append(f"| {layer + 1} | {r['agreement_by_layer'][layer]:.1%} | " + " | ".join(f"{ex[s][layer]:.1%}" for s in SIGNALS) + " |")
        c = r["costs_ms"]
        lines += ["", f"Rules, simulated on the scored half with this machine's piece costs ({r['costs_origin']}: block {c['block']:.3f} ms, "
                  f"check {c['check']:.3f}, state copy {c['fill']:.3f}, exit head {c['exit_head']:.3f}, final head {c['final_head']:.3f}):", "",
                  "| rule | asked after blocks | target | ms/token | vs full | mean layers | agreement with full |", "|---|---|---|---|---|---|---|"]
        for rule in sorted(r["rules"], key=lambda x: x["ms_per_token"]):
            target = "-" if rule["target"] is None else f"{rule['target']:g}"
            lines.append(f"| {rule['rule']} | {','.join(map(str, rule['asked']))} | {target} | {rule['ms_per_token']:.2f} | "
                         f"{rule['speedup_vs_full']:.3f}× | {rule['mean_layers']:.2f} | {rule['agreement']:.2%} |")
        lines.append("")
    lines.append("![exitable share by layer](exitable.png)")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        layers = list(range(1, r["n_layer"]))
        ax.plot(layers, r["agreement_by_layer"], "k--", label="agrees with the last layer")
        for name in SIGNALS:
            ax.plot(layers, r["exitable"][f"{target:g}"][name], marker="o", label=f"exitable by {name}")
        ax.set_title(Path(r["model"]).name or r["model"], fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"share of tokens (precision {target:g})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from earlyexit.errors import EarlyExitError
    from earlyexit.runtime.loading import resolve_model_dir

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        targets = [float(t) for t in args.targets.split(",")]
        if not all(0 < t <= 1 for t in targets) or args.windows < 2:
            raise ValueError
    except ValueError:
        print("error: --targets takes precisions in (0, 1], --windows at least 2", file=sys.stderr)
        return 2
    try:
        results = [study(resolve_model_dir(m), args, targets) for m in (args.model or [None])]
    except EarlyExitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"stamp": stamp(", ".join(r["model"] for r in results), vars(args)), "models": results}
    out = write_results("exit_signals", result, render(results, targets))
    plot(results, targets[0], out / "exitable.png")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
