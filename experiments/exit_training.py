"""A backbone trained to exit against the one it continued, side by side on the same test-split tokens.

    python experiments/exit_training.py --config configs/exit_training.yaml [key=value ...] [--limit N]

For each model (its own exit heads): teacher-forced over the same windows of the test split, the share of tokens
first right at each layer and first agreeing with the model's own last layer there (per_layer_study's measure), the
oracle mean depth (the first layer agreeing with the last, averaged over tokens: what a perfect controller would
run), the last layer's loss and top-1 on those tokens, and the controller's mean depth at the exit threshold
`earlyexit.training.calibrate` certified for that model (its exit_heads.json: agreement with the full model on real
decoding of validation prompts). Writes experiments/results/exit_training/ (JSON, Markdown, one plot of both).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_model_and_heads, stamp, write_results  # noqa: E402
from per_layer_study import first_layers, save_by_layer_plot, token_windows  # noqa: E402


@dataclass
class ExitTrainingConfig:
    before: str = "earlyexit/default_model"
    after: str = "runs/default_lm_exit/export"
    seq_len: int = 256
    windows: int = 200
    seed: int = 0
    plot: bool = True


@torch.no_grad()
def last_layer_quality(model, windows: torch.Tensor, batch: int = 8) -> dict:
    from earlyexit.training.train_heads import layer_states

    loss, hits, count = 0.0, 0, 0
    for chunk in windows.split(batch):
        x, target = chunk[:, :-1], chunk[:, 1:]
        logits = model.logits(layer_states(model, x, bf16=False)[-1]).float()  # (B, T, V)
        loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        hits += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"test_loss": loss / count, "test_top1": hits / count}


def calibrated_depth(heads) -> dict:
    """The certified exit threshold and the mean layers the controller ran at it, from the heads' calibration."""
    cal = heads.cfg.calibration
    if not cal:
        return {"calibrated_exit": None, "controller_mean_layers": None}
    row = next((r for r in cal["table"] if r["threshold"] == cal["chosen_exit"]), None)
    return {"calibrated_exit": cal["chosen_exit"], "controller_mean_layers": row and row["mean_layers"],
            "calibration_agreement": row and row["agreement"]}


def measure(model_dir: str, windows_of) -> dict:
    model, tok, heads = load_model_and_heads(model_dir)
    windows = windows_of(tok)
    right, agree = first_layers(model, heads, windows)
    L = model.dims.n_layer
    return {
        "model": model_dir, "n_layer": L, "tokens": int(right.size),
        "right_at_layer_1": float((right == 1).mean()), "wrong_at_all_layers": float((right == 0).mean()),
        "oracle_mean_depth": float(agree.mean()),
        "right_by_layer": [float(((right > 0) & (right <= i)).mean()) for i in range(1, L + 1)],
        "agree_by_layer": [float(((agree > 0) & (agree <= i)).mean()) for i in range(1, L + 1)],
        **last_layer_quality(model, windows), **calibrated_depth(heads),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("before", "--"), ("after", "-")):
        r = result[name]
        layers = np.arange(1, r["n_layer"] + 1)
        ax.plot(layers, r["right_by_layer"], style, marker="o", color="C0", label=f"{name}: right vs reference")
        ax.plot(layers, r["agree_by_layer"], style, marker="s", color="C1", label=f"{name}: agrees with its last layer")
    save_by_layer_plot(fig, ax, layers, "Trained to exit: where tokens are first right (teacher-forced, test split)", path)


def table(result: dict) -> str:
    b, a = result["before"], result["after"]
    rows = [("tokens right at layer 1", "right_at_layer_1", "{:.1%}"), ("tokens wrong at every layer", "wrong_at_all_layers", "{:.1%}"),
            ("oracle mean depth (first layer agreeing with the last)", "oracle_mean_depth", "{:.2f}"),
            ("controller mean depth at the calibrated exit threshold", "controller_mean_layers", "{:.2f}"),
            ("calibrated exit threshold", "calibrated_exit", "{}"),
            ("last-layer loss on these tokens", "test_loss", "{:.3f}"), ("last-layer top-1", "test_top1", "{:.1%}")]
    fmt = lambda f, v: "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"Teacher-forced over the same {b['tokens']:,} test-split tokens; before: `{b['model']}`, after: `{a['model']}`.", "",
             "| | before | after |", "|---|---|---|", *[f"| {name} | {fmt(f, b[k])} | {fmt(f, a[k])} |" for name, k, f in rows],
             "", "| layer | right by here, before | after | agrees with last by here, before | after |", "|---|---|---|---|---|",
             *[f"| {i + 1} | {b['right_by_layer'][i]:.1%} | {a['right_by_layer'][i]:.1%} | "
               f"{b['agree_by_layer'][i]:.1%} | {a['agree_by_layer'][i]:.1%} |"
               for i in range(b["n_layer"])],
             "", "![cumulative share by layer, both models](by_layer.png)"]
    return "\n".join(lines)


def run(cfg: ExitTrainingConfig, limit: int | None) -> Path:
    from earlyexit.data.corpus import model_corpus

    if limit:
        cfg.windows = min(cfg.windows, limit)
    test_files = model_corpus(cfg.before)[0]["test"]

    def windows_of(tok):  # the same token windows for both models: they share the tokenizer (train_lm's init_from)
        return token_windows(test_files, tok, cfg.windows, cfg.seq_len, cfg.seed)

    from dataclasses import asdict

    result = {"stamp": stamp(f"{cfg.before} vs {cfg.after}", asdict(cfg)),
              "before": measure(cfg.before, windows_of), "after": measure(cfg.after, windows_of)}
    out = write_results("exit_training", result, table(result))
    if cfg.plot:
        plot(result, out / "by_layer.png")
    print(table(result))
    return out


def main(argv=None) -> int:
    from earlyexit.config import config_parser, exit_code, load_config

    parser = config_parser(__doc__.split("\n\n")[0], ExitTrainingConfig)
    parser.add_argument("--limit", type=int, help="quick run: at most this many windows")
    args = parser.parse_args(argv)
    return exit_code(lambda: run(load_config(ExitTrainingConfig, args.config, args.overrides), args.limit))


if __name__ == "__main__":
    sys.exit(main())
