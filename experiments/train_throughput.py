"""Training throughput of the backbone recipe under each speed lever, measured side by side in one run.

    python experiments/train_throughput.py [--config configs/default_lm/base.yaml] [--steps 8]

For each variant (fp32, bf16 autocast, bf16 + torch.compile, other batch shapes) a fresh
model of the recipe's shape takes `--steps` optimizer steps on the recipe's real training
windows; the median step after warm-up gives tokens/s. Needs the tokenized corpus in the
recipe's work_dir (train_lm builds it on first run): on the machine that trains the default
model, pass the current phase's config. Writes experiments/results/train_throughput/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_results  # noqa: E402

# every variant names its batch shape, so the table reads the same whichever recipe config supplies data and model
VARIANTS = [
    ("fp32", ["bf16=false", "compile=false", "batch_size=16", "seq_len=256"]),
    ("bf16 autocast", ["bf16=true", "compile=false", "batch_size=16", "seq_len=256"]),
    ("bf16, batch 32", ["bf16=true", "compile=false", "batch_size=32", "seq_len=256"]),
    ("bf16, 8 x 512", ["bf16=true", "compile=false", "batch_size=8", "seq_len=512"]),
    ("bf16 + torch.compile", ["bf16=true", "compile=true", "batch_size=16", "seq_len=256"]),
    ("bf16 + torch.compile, 8 x 512", ["bf16=true", "compile=true", "batch_size=8", "seq_len=512"]),
]


def measure(cfg, steps: int) -> float:
    from earlyexit.training.train_lm import batch_at, build_model, prepare_data

    tok, tokens, _ = prepare_data(cfg)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fn = torch.compile(model) if cfg.compile else model
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x = batch_at(tokens["train"], cfg, step, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = fn(x[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    settled = sorted(times[3:])
    return cfg.batch_size * cfg.seq_len / settled[len(settled) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/default_lm/base.yaml"))
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    from earlyexit.config import load_config
    from earlyexit.training.train_lm import LMTrainConfig

    rows = []
    for name, overrides in VARIANTS:
        cfg = load_config(LMTrainConfig, args.config, overrides)
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        rows.append({"variant": name, "overrides": overrides, "tokens_per_s": measure(cfg, args.steps)})
        print(f"{name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    base = rows[0]["tokens_per_s"]
    table = ["| variant | tokens/s | vs fp32 |", "|---|---|---|"] + [
        f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}× |" for r in rows]
    out = write_results("train_throughput", {"stamp": stamp("fresh model from " + args.config, vars(args)), "rows": rows}, "\n".join(table))
    print("\n".join(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
