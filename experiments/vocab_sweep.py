"""Short training runs that choose the vocabulary size, measured in nats per byte of validation text.

    python experiments/vocab_sweep.py --config configs/vocab_sweep.yaml [key=value ...]

For each vocabulary size a byte-level BPE is trained on one seeded sample of the recipe's
training files (the same sample for every size), the sample and the whole validation and
test splits are encoded with it, and a proxy `earlyexit.training.train_lm` run (the recipe sweep's:
small model, few steps, from scratch) trains on it. Losses per token are not comparable
across tokenizers: a larger vocabulary packs more text into each token. Each run's loss is
therefore also given per byte (loss x validation tokens / validation bytes: the evaluation
windows are spread evenly over the split, so its average bytes per token applies), with the
bytes of text the run saw and read per second. Writes experiments/results/vocab_sweep/
(JSON, Markdown, a plot of nats per byte against vocabulary size).

What it cannot say: every run takes the same number of steps, so a larger vocabulary sees
more text but also trains a larger embedding on fewer examples per row; a long run may
rank the sizes differently, as it may the learning rates of recipe_sweep.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training_experiment_main  # noqa: E402
from recipe_sweep import ProxyRunConfig, parse_shape, run_one  # noqa: E402

from earlyexit.config import load_config  # noqa: E402
from earlyexit.errors import EarlyExitError  # noqa: E402


@dataclass
class VocabSweepConfig(ProxyRunConfig):
    vocab_sizes: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    sample_bytes: int = 12_000_000  # training text per size: the tokenizer learns from it and the proxy trains on it
    shape: str = "6x128"
    lr: float = 1.2e-3  # recipe_sweep's best at 6x128
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        parse_shape(self.shape)
        if not self.vocab_sizes or any(not 257 <= v < 65536 for v in self.vocab_sizes):
            raise EarlyExitError("vocab_sizes must be a non-empty list of sizes in [257, 65535] (256 bytes + EOS at least, uint16 storage)")
        if not 0 < self.lr < 1:
            raise EarlyExitError(f"lr must be in (0, 1), got {self.lr}")
        if self.sample_bytes <= 0:
            raise EarlyExitError(f"sample_bytes must be positive, got {self.sample_bytes}")


def text_bytes(rows: list[dict]) -> int:
    return sum(len(r["text"].encode("utf-8")) for r in rows)


def encoded_corpus(splits: dict, vocab: int, out: Path, cfg: VocabSweepConfig) -> dict:
    """A train_lm work_dir at `out` with its own tokenizer and token caches: its vocabulary and token counts."""
    import numpy as np

    from earlyexit.data.tokenizer import train_tokenizer
    from earlyexit.training.lm_data import encode_split

    out.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in splits["train"]]
    tok = train_tokenizer(texts, vocab, out / "tokenizer", max_bytes=None, seed=cfg.seed)
    for split, rows in splits.items():
        encode_split(tok, rows, out, split)
    tokens = {s: int(np.load(out / f"tokens_{s}.npy", mmap_mode="r").shape[0]) for s in splits}
    (out / "corpus.json").write_text(json.dumps({"tokens": tokens, "vocab_size": len(tok)}, indent=2))
    return {"vocab_size": len(tok), "validation_tokens": tokens["validation"], "train_tokens": tokens["train"]}


def sweep(cfg: VocabSweepConfig) -> dict:
    from earlyexit.data.corpus import read_configured_corpus
    from earlyexit.data.tokenizer import seeded_sample
    from earlyexit.training.train_lm import LMTrainConfig

    if not Path(cfg.recipe).is_file():
        raise EarlyExitError(f"recipe config not found: {cfg.recipe}")
    lm = load_config(LMTrainConfig, cfg.recipe)
    print(f"reading corpus {lm.sources} ...", flush=True)
    splits, _ = read_configured_corpus(lm)
    # a seeded sample of whole training files, about sample_bytes of text
    sample = list(seeded_sample(splits["train"], cfg.sample_bytes, cfg.seed, size=lambda r: len(r["text"].encode("utf-8"))))
    splits = {**splits, "train": sample}
    sample_bytes, validation_bytes = text_bytes(sample), text_bytes(splits["validation"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="vocab_sweep_") as tmp:
        for vocab in cfg.vocab_sizes:
            data = encoded_corpus(splits, vocab, Path(tmp) / f"vocab{vocab}", cfg)
            run = run_one(cfg, cfg.shape, cfg.lr, Path(tmp), Path(tmp) / f"vocab{vocab}")
            bytes_per_token = validation_bytes / data["validation_tokens"]
            rows.append({**run, **data, "requested_vocab_size": vocab, "bytes_per_token": bytes_per_token,
                         "validation_bytes": validation_bytes, "val_nats_per_byte": run["val_loss"] / bytes_per_token,
                         "train_bytes_seen": run["tokens"] * sample_bytes / data["train_tokens"],
                         "bytes_per_s": run["tokens_per_s"] * sample_bytes / data["train_tokens"],
                         "embedding_parameters": data["vocab_size"] * run["width"]})
            print(f"vocab {vocab}: val {run['val_loss']:.3f} nats/token, {rows[-1]['val_nats_per_byte']:.4f} nats/byte", flush=True)
    best = min(rows, key=lambda r: r["val_nats_per_byte"])
    return {"rows": rows, "sample_files": len(splits["train"]), "sample_bytes": sample_bytes, "best_vocab_size": best["vocab_size"]}


def render(cfg: VocabSweepConfig, result: dict) -> str:
    lines = [f"Proxy runs ({cfg.shape}, lr {cfg.lr:g}, {cfg.steps} steps of {cfg.batch_size} × {cfg.seq_len} tokens from scratch, "
             f"cosine to lr/10 after {cfg.warmup_steps} warm-up steps) on {result['sample_files']:,} training files "
             f"({result['sample_bytes'] / 1e6:.1f} MB, the same sample for every size), each with its own byte-level BPE "
             f"trained on that sample; validation over {cfg.eval_windows} windows of `{cfg.recipe}`'s validation split.", "",
             "| vocabulary | bytes/token | validation nats/token | validation nats/byte | top-1 | text seen (MB) | "
             "embedding parameters | tokens/s | KB of text/s | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['vocab_size']:,} | {r['bytes_per_token']:.2f} | {r['val_loss']:.3f} | {r['val_nats_per_byte']:.4f} | "
                     f"{r['val_top1']:.1%} | {r['train_bytes_seen'] / 1e6:.2f} | {r['embedding_parameters'] / 1e6:.2f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['bytes_per_s'] / 1e3:,.1f} | {r['seconds']:.0f} |")
    lines += ["", f"Lowest loss per byte: vocabulary {result['best_vocab_size']:,}. Every run takes the same steps, so a larger "
              "vocabulary sees more text (the text-seen column) for about the same compute per step."]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([r["vocab_size"] for r in rows], [r["val_nats_per_byte"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("validation loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(out / "vocab_sweep.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    return training_experiment_main(argv, __doc__, VocabSweepConfig, "vocab_sweep", "fresh proxy models", sweep, render, plot)


if __name__ == "__main__":
    sys.exit(main())
