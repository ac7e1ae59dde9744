"""Short training runs that choose the recipe's warm-up and effective batch, measured instead of guessed.

    python experiments/schedule_sweep.py --config configs/schedule_sweep.yaml [key=value ...]

The same proxy as experiments/recipe_sweep.py (a small model from scratch on the default
model's tokenized corpus, every run `earlyexit.training.train_lm` itself), at the shape and peak
learning rate that sweep chose. Two sweeps share one baseline: the warm-up length, then
the effective batch by gradient accumulation at the same tokens seen (accumulating k
batches means 1/k as many optimizer steps, so the warm-up shrinks with them). Writes
experiments/results/schedule_sweep/ (JSON, Markdown, a plot).

What it cannot say: a short run favours many small steps, so a larger effective batch
that loses here may still pay late in a long run (and usually wants a higher learning
rate than the one held fixed here).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training_experiment_main  # noqa: E402
from recipe_sweep import ProxyRunConfig, parse_shape, require_corpus, run_one  # noqa: E402

from earlyexit.errors import EarlyExitError  # noqa: E402


@dataclass
class ScheduleSweepConfig(ProxyRunConfig):
    data_dir: str = "runs/default_lm"  # a train_lm work_dir holding the tokenizer and the token caches
    shape: str = "6x128"
    lr: float = 1.2e-3
    warmups: list[int] = field(default_factory=lambda: [10, 30, 100])  # in batch_size-window steps
    grad_accums: list[int] = field(default_factory=lambda: [1, 2, 4])  # at the base warm-up (ProxyRunConfig's)

    def __post_init__(self):
        super().__post_init__()
        parse_shape(self.shape)
        if not 0 < self.lr < 1:
            raise EarlyExitError(f"lr must be in (0, 1), got {self.lr}")
        if not self.warmups or any(not 0 < w < self.steps for w in self.warmups):
            raise EarlyExitError(f"warmups must be a non-empty list of step counts in (0, {self.steps})")
        if not self.grad_accums or any(not 1 <= k <= self.steps for k in self.grad_accums):
            raise EarlyExitError(f"grad_accums must be a non-empty list of integers in [1, {self.steps}]")


def sweep(cfg: ScheduleSweepConfig) -> dict:
    rows, done = [], {}
    with tempfile.TemporaryDirectory(prefix="schedule_sweep_") as tmp:
        def run(name: str, warmup: int, accum: int) -> None:
            key = (warmup, accum)
            if key not in done:  # the baseline belongs to both sweeps: run it once
                done[key] = run_one(cfg, cfg.shape, cfg.lr, Path(tmp), cfg.data_dir, warmup_steps=warmup, grad_accum=accum)
                print(f"warm-up {warmup}, accumulation {accum}: val {done[key]['val_loss']:.3f}", flush=True)
            rows.append({"sweep": name, "effective_batch": cfg.batch_size * accum, **done[key]})

        for warmup in cfg.warmups:
            run("warm-up", warmup, 1)
        for accum in cfg.grad_accums:
            run("effective batch", cfg.warmup_steps, accum)

    def best(name, key):
        return min((r for r in rows if r["sweep"] == name), key=lambda r: r["val_loss"])[key]
    return {"rows": rows, "best_warmup": best("warm-up", "warmup_steps"), "best_effective_batch": best("effective batch", "effective_batch")}


def render(cfg: ScheduleSweepConfig, result: dict) -> str:
    lines = [f"Proxy runs of `{cfg.recipe}` at {cfg.shape}, peak lr {cfg.lr:g}: {cfg.steps * cfg.batch_size:,} windows of "
             f"{cfg.seq_len} tokens from scratch, cosine to lr/10; validation loss over {cfg.eval_windows} windows. "
             f"Accumulating k batches of {cfg.batch_size} takes {cfg.steps}/k optimizer steps, the warm-up shrinking with them.", "",
             "| sweep | warm-up (optimizer steps) | effective batch (windows) | optimizer steps | validation loss | top-1 | tokens/s | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sweep']} | {r['warmup_steps']} | {r['effective_batch']} | {r['steps']} | {r['val_loss']:.3f} | "
                     f"{r['val_top1']:.1%} | {r['tokens_per_s']:,.0f} | {r['seconds']:.0f} |")
    lines += ["", f"Best warm-up: {result['best_warmup']} steps; best effective batch at {cfg.warmup_steps} warm-up steps: "
                  f"{result['best_effective_batch']} windows."]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, (name, key, label) in zip(axes, (("warm-up", "warmup_steps", "warm-up steps"),
                                              ("effective batch", "effective_batch", "effective batch (windows)"))):
        rows = [r for r in result["rows"] if r["sweep"] == name]
        ax.plot([r[key] for r in rows], [r["val_loss"] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
    axes[0].set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(out / "schedule_sweep.png", dpi=120)
    plt.close(fig)


def compute(cfg: ScheduleSweepConfig) -> dict:
    require_corpus(cfg.data_dir)
    return sweep(cfg)


def main(argv=None) -> int:
    return training_experiment_main(argv, __doc__, ScheduleSweepConfig, "schedule_sweep", "fresh proxy models", compute, render, plot)


if __name__ == "__main__":
    sys.exit(main())
