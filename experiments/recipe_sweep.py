"""Short training runs that choose the recipe's learning rate and depth against width, measured instead of guessed.

    python experiments/recipe_sweep.py --config configs/recipe_sweep.yaml [key=value ...]

Every run is `earlyexit.training.train_lm` itself (same data order, optimizer, schedule and
evaluation) on a proxy of the shipped recipe: a smaller model and fewer steps, from
scratch, on the default model's tokenized corpus (`data_dir`, built by train_lm). Two
sweeps share one baseline: the learning rate at the base shape, then shapes of about the
same parameter count (layers x width) at the best learning rate found. Each run reports
its validation loss at the last step, tokens/s and wall time. Writes
experiments/results/recipe_sweep/ (JSON, Markdown, a plot of loss against learning rate).

What it cannot say: whether the proxy's best learning rate carries over to the full
model's width (it usually shrinks as the width grows). The vocabulary size, which needs a
new tokenizer and corpus encoding per point, is experiments/vocab_sweep.py's.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training_experiment_main  # noqa: E402

from earlyexit.config import load_config  # noqa: E402
from earlyexit.errors import EarlyExitError  # noqa: E402

CORPUS_FILES = ("corpus.json", "tokens_train.npy", "tokens_validation.npy", "tokens_test.npy",
                "files_train.txt", "files_validation.txt", "files_test.txt")


@dataclass
class ProxyRunConfig:
    """What every proxy run shares (this sweep's and experiments/vocab_sweep.py's)."""

    recipe: str = "configs/default_lm/phase4.yaml"  # what the runs share unless swept or overridden below
    steps: int = 300
    warmup_steps: int = 30
    seq_len: int = 256
    batch_size: int = 8
    eval_windows: int = 64
    threads: int = 0
    plot: bool = True

    def __post_init__(self):
        if self.steps <= self.warmup_steps:
            raise EarlyExitError(f"steps ({self.steps}) must exceed warmup_steps ({self.warmup_steps})")


@dataclass
class RecipeSweepConfig(ProxyRunConfig):
    data_dir: str = "runs/default_lm"  # a train_lm work_dir holding the tokenizer and the token caches
    base_shape: str = "6x128"  # layers x width; heads = width / 32
    learning_rates: list[float] = field(default_factory=lambda: [3e-4, 6e-4, 1.2e-3, 2.4e-3])
    shapes: list[str] = field(default_factory=lambda: ["3x192", "12x96"])  # about base_shape's parameters

    def __post_init__(self):
        super().__post_init__()
        for s in [self.base_shape, *self.shapes]:
            parse_shape(s)
        if not self.learning_rates or any(not 0 < lr < 1 for lr in self.learning_rates):
            raise EarlyExitError("learning_rates must be a non-empty list of values in (0, 1)")


def parse_shape(shape: str) -> tuple[int, int, int]:
    """'6x128' -> (layers 6, width 128, heads 4): heads of 32 dimensions."""
    try:
        layers, width = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise EarlyExitError(f"a shape is 'LAYERSxWIDTH' (e.g. 6x128), got {shape!r}") from None
    if layers < 1 or width < 32 or width % 32:
        raise EarlyExitError(f"shape {shape!r}: at least one layer, and a width that is a multiple of 32")
    return layers, width, width // 32


def run_one(cfg: ProxyRunConfig, shape: str, lr: float, scratch: Path, data_dir: str | Path, warmup_steps: int | None = None,
            grad_accum: int = 1) -> dict:
    """One short train_lm run in its own work_dir beside links to the corpus in `data_dir` (a train_lm
    work_dir: tokenizer and token caches): its last evaluation and speed.

    grad_accum > 1 keeps the tokens seen: cfg.steps / grad_accum optimizer steps of grad_accum x batch_size windows,
    and the warm-up shrinks with them (warmup_steps, default cfg.warmup_steps, counts batch_size-window steps).
    """
    from earlyexit.training.train_lm import LMTrainConfig, train

    layers, width, heads = parse_shape(shape)
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    steps, warmup = cfg.steps // grad_accum, max(1, warmup // grad_accum)
    data = Path(data_dir)
    work = scratch / f"{data.name}_{shape}_lr{lr:g}_w{warmup}_a{grad_accum}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in CORPUS_FILES:
        (work / name).symlink_to((data / name).resolve())
    (work / "tokenizer").symlink_to((data / "tokenizer").resolve(), target_is_directory=True)
    run_cfg = load_config(LMTrainConfig, cfg.recipe, [
        f"n_layer={layers}", f"n_embd={width}", f"n_head={heads}", f"n_positions={cfg.seq_len}", f"seq_len={cfg.seq_len}",
        f"batch_size={cfg.batch_size}", f"grad_accum={grad_accum}", f"lr={lr}", f"min_lr={lr / 10}", "schedule=cosine", "rewarm_at=0",
        f"warmup_steps={warmup}", f"max_steps={steps}", "decay_steps=0", "compile=false",
        f"eval_interval={steps}", f"eval_windows={cfg.eval_windows}", f"checkpoint_interval={steps}",
        f"threads={cfg.threads}", f"work_dir={work}", f"out_dir={work / 'export'}", "max_minutes=0",
    ])
    t0 = time.time()
    train(run_cfg)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    tok_s = sorted(r["tok_s"] for r in log[len(log) // 4:])  # past the first steps' warm-up
    parameters = layers * 12 * width * width
    return {"shape": shape, "layers": layers, "width": width, "block_parameters": parameters, "lr": lr,
            "warmup_steps": warmup, "grad_accum": grad_accum, "steps": steps,
            "val_loss": last["val_loss"], "val_top1": last["val_top1"], "train_loss_last": last["loss"],
            "tokens": last["tokens_seen"], "tokens_per_s": tok_s[len(tok_s) // 2], "seconds": round(time.time() - t0, 1)}


def sweep(cfg: RecipeSweepConfig) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="recipe_sweep_") as tmp:
        for lr in cfg.learning_rates:
            rows.append({"sweep": "learning rate", **run_one(cfg, cfg.base_shape, lr, Path(tmp), cfg.data_dir)})
            print(f"{cfg.base_shape} lr {lr:g}: val {rows[-1]['val_loss']:.3f}", flush=True)
        best_lr = min(rows, key=lambda r: r["val_loss"])["lr"]
        for shape in cfg.shapes:
            rows.append({"sweep": "shape", **run_one(cfg, shape, best_lr, Path(tmp), cfg.data_dir)})
            print(f"{shape} lr {best_lr:g}: val {rows[-1]['val_loss']:.3f}", flush=True)
    return {"rows": rows, "best_lr": best_lr,
            "best_shape": min([r for r in rows if r["lr"] == best_lr], key=lambda r: r["val_loss"])["shape"]}


def render(cfg: RecipeSweepConfig, result: dict) -> str:
    lines = [f"Proxy runs of `{cfg.recipe}`: {cfg.steps} steps of {cfg.batch_size} × {cfg.seq_len} tokens from scratch, "
             f"cosine to lr/10 after {cfg.warmup_steps} warm-up steps; validation loss over {cfg.eval_windows} windows.", "",
             "| sweep | shape (layers × width) | block parameters | learning rate | validation loss | top-1 | tokens/s | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sweep']} | {r['shape']} | {r['block_parameters'] / 1e6:.2f}M | {r['lr']:g} | {r['val_loss']:.3f} | "
                     f"{r['val_top1']:.1%} | {r['tokens_per_s']:,.0f} | {r['seconds']:.0f} |")
    lines += ["", f"Best learning rate at {cfg.base_shape}: {result['best_lr']:g}; best shape at that rate: {result['best_shape']}."]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    lr_rows = [r for r in result["rows"] if r["sweep"] == "learning rate"]
    ax.plot([r["lr"] for r in lr_rows], [r["val_loss"] for r in lr_rows], "o-", label=lr_rows[0]["shape"])
    for r in result["rows"]:
        if r["sweep"] == "shape":
            ax.plot([r["lr"]], [r["val_loss"]], "s", label=r["shape"])
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(title="layers × width")
    fig.tight_layout()
    fig.savefig(out / "recipe_sweep.png", dpi=120)
    plt.close(fig)


def require_corpus(data_dir: str) -> None:
    """The proxy runs link a train_lm work_dir's tokenizer and token caches: refuse one without them."""
    for name in (*CORPUS_FILES, "tokenizer"):
        if not (Path(data_dir) / name).exists():
            raise EarlyExitError(f"{data_dir} has no {name}: run earlyexit.training.train_lm once to build the tokenized corpus")


def compute(cfg: RecipeSweepConfig) -> dict:
    require_corpus(cfg.data_dir)
    return sweep(cfg)


def main(argv=None) -> int:
    return training_experiment_main(argv, __doc__, RecipeSweepConfig, "recipe_sweep", "fresh proxy models", compute, render, plot)


if __name__ == "__main__":
    sys.exit(main())
