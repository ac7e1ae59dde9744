"""Member completion, the IntelliCode task: after `name.`, is the member the model ranks first the right one?

    python experiments/member_completion.py [--model DIR] [--config configs/member_completion.yaml] [--limit N] [key=value ...]

Sites: every `.` in the test files that follows an identifier, `)` or `]` and is followed
by a member name starting with a letter, where the tokenizer puts a token boundary right
after the dot (members starting with `_` merge with the dot into one token in byte-level
BPE and are counted, not scored). Teacher-forced over overlapping windows (each site keeps
at least seq_len - stride tokens of context), the model's next-token distribution at the
dot is ranked against the member's first token: top-1, top-5 and mean reciprocal rank.

`full` ranks the last layer's logits. `early-exit` ranks the logits of the layer the
controller exits at (first layer whose action is exit above the threshold; the previous
token's exit layer is the teacher-forced stand-in train_heads uses), with the mean layers
used. In live completion the first token after a prompt comes from the prefill, which runs
every layer anyway, so `early-exit` equals `full` there; the early-exit column is what an
exit costs when a member access comes mid-completion. Writes experiments/results/member_completion/.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_main, load_model_and_heads, stamp, test_split_files, write_results  # noqa: E402

MEMBER_DOT = re.compile(r"(?<=[A-Za-z0-9_\)\]])\.(?=[A-Za-z_])")


@dataclass
class MemberConfig:
    max_sites: int = 2000
    seq_len: int = 256
    stride: int = 192
    batch_size: int = 8
    exit_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])  # the heads' chosen one is added
    seed: int = 0


def member_sites(text: str, tok) -> tuple[list[int], list[int], int]:
    """Token ids of a file and the token positions whose token ends at a member dot with a boundary after it.

    Returns (ids, positions, merged): `merged` counts dots whose member shares a token with the dot.
    """
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends = {end: i for i, (_, end) in enumerate(offsets)}
    positions, merged = [], 0
    for m in MEMBER_DOT.finditer(text):
        i = ends.get(m.end())
        if i is None or i + 1 >= len(ids) or text[m.end()] == "_":
            merged += 1
            continue
        positions.append(i)
    return ids, positions, merged


def windows_for(ids: list[int], positions: list[int], seq_len: int, stride: int) -> dict[int, list[int]]:
    """Window start -> site positions it scores; each site gets >= seq_len - stride tokens of context (or the file's start)."""
    out: dict[int, list[int]] = {}
    for p in positions:
        start = max(0, (p - (seq_len - stride)) // stride * stride)
        start = min(start, max(0, len(ids) - seq_len))
        if p - start < seq_len:
            out.setdefault(start, []).append(p)
    return out


def rank_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target: (N, V), (N,) -> (N,)."""
    return (logits > logits.gather(1, target[:, None])).sum(1) + 1


@torch.no_grad()
def score(model, heads, tok, files, cfg: MemberConfig, thresholds: list[float]):
    """Full ranks (N,), per threshold (ranks, layers used), every layer's ranks (L, N), sites found, sites merged."""
    from tqdm import tqdm

    from earlyexit.runtime.heads import EXIT
    from earlyexit.training.train_heads import layer_states, previous_exit_layers

    jobs, merged = [], 0  # (window ids, offset of the dot token in the window)
    for f in files:
        ids, positions, m = member_sites(f["text"], tok)
        merged += m
        for start, ps in windows_for(ids, positions, cfg.seq_len, cfg.stride).items():
            window = ids[start:start + cfg.seq_len + 1]
            jobs += [(window, p - start) for p in ps if p - start + 1 < len(window)]
    total_sites = len(jobs)
    if len(jobs) > cfg.max_sites:
        rng = np.random.default_rng(cfg.seed)
        jobs = [jobs[i] for i in sorted(rng.choice(len(jobs), cfg.max_sites, replace=False))]
    by_len: dict[int, list[tuple[list[int], int]]] = {}
    for window, offset in jobs:  # equal-length windows batch together (no padding)
        by_len.setdefault(len(window), []).append((window, offset))
    batches = [group[i:i + cfg.batch_size] for group in by_len.values() for i in range(0, len(group), cfg.batch_size)]
    L = model.dims.n_layer
    all_ranks, all_probs = [], []
    for batch in tqdm(batches, desc="windows"):
        x = torch.tensor([w[:-1] for w, _ in batch], device=model.device)
        rows = torch.arange(len(batch))
        pos = torch.tensor([o for _, o in batch])
        target = torch.tensor([w[o + 1] for w, o in batch])
        hidden = layer_states(model, x, bf16=False)
        states = [h[rows, pos] for h in hidden]  # L x (N, d) at the dots
        ranks = torch.stack([rank_of(heads.head_logits(layer, h, model), target) for layer, h in enumerate(states)])  # (L, N)
        all_ranks.append(ranks)
        # the previous token's exit layer, teacher-forced as in train_heads: heads' predictions at [dot - 1, dot]
        pair = torch.stack([(pos - 1).clamp(min=0), pos], dim=1)  # (N, 2)
        preds = torch.stack([heads.head_logits(layer, h[rows[:, None], pair], model).argmax(-1) for layer, h in enumerate(hidden)])
        prev = torch.where(pos > 0, previous_exit_layers(preds)[:, 1], torch.zeros_like(pos))
        all_probs.append(torch.stack([heads.action_logits(layer, h, prev) for layer, h in enumerate(states[:-1])]).softmax(-1))
    ranks, probs = torch.cat(all_ranks, dim=1), torch.cat(all_probs, dim=1)  # (L, N), (L-1, N, 3)
    per_threshold = {}
    for tau in thresholds:
        fire = (probs.argmax(-1) == EXIT) & (probs[..., EXIT] > tau)  # (L-1, N)
        layer = torch.where(fire.any(0), fire.float().argmax(0), torch.full_like(ranks[0], L - 1))
        per_threshold[tau] = (ranks.gather(0, layer[None])[0].numpy(), (layer + 1).numpy())
    return ranks[-1].numpy(), per_threshold, ranks.numpy(), total_sites, merged


def summary(ranks: np.ndarray) -> dict:
    return {"top1": float((ranks == 1).mean()), "top5": float((ranks <= 5).mean()), "mrr": float((1.0 / ranks).mean())}


def main(argv=None) -> int:
    return experiment_main(argv, __doc__, MemberConfig, run, "quick run: at most this many sites")


def run(args, cfg: MemberConfig) -> None:
    from earlyexit.errors import EarlyExitError
    from earlyexit.runtime.heads import Thresholds
    from earlyexit.runtime.loading import resolve_model_dir

    if args.limit:
        cfg.max_sites = min(cfg.max_sites, args.limit)
    model_dir = resolve_model_dir(args.model)
    model, tok, heads = load_model_and_heads(model_dir)
    chosen = heads.cfg.thresholds.exit
    thresholds = sorted({Thresholds(exit=t).exit for t in cfg.exit_thresholds} | {chosen})
    full, per_threshold, layer_ranks, total, merged = score(model, heads, tok, test_split_files(model_dir, args.data), cfg, thresholds)
    if not len(full):
        raise EarlyExitError("no member-access sites in the test files")
    L = model.dims.n_layer
    rows = [{"exit_threshold": t, "chosen": t == chosen, **summary(r), "mean_layers": float(layers.mean())}
            for t, (r, layers) in per_threshold.items()]
    result = {"stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or "test split"}), "n_layer": L, "sites_found": total,
              "sites_scored": int(len(full)),
              "merged_with_dot_skipped": merged, "full": summary(full), "early_exit": rows,
              "per_layer_top1": [float((r == 1).mean()) for r in layer_ranks]}
    f = result["full"]
    lines = [
        f"{len(full):,} member-access sites (sampled from {total:,}; {merged:,} members that share a token with the dot are not "
        f"scored) in the test split, teacher-forced with ≥ {cfg.seq_len - cfg.stride} tokens of context.",
        "", "| policy | top-1 | top-5 | MRR | mean layers |", "|---|---|---|---|---|",
        f"| full | {f['top1']:.1%} | {f['top5']:.1%} | {f['mrr']:.3f} | {L} |",
        *[f"| early-exit {r['exit_threshold']:g}{' (chosen)' if r['chosen'] else ''} | {r['top1']:.1%} | {r['top5']:.1%} | "
          f"{r['mrr']:.3f} | {r['mean_layers']:.2f} |" for r in rows],
        "", "Top-1 of each layer's exit head at the sites (what an exit at that layer would give): "
        + ", ".join(f"L{i + 1} {v:.1%}" for i, v in enumerate(result["per_layer_top1"])) + ".",
    ]
    write_results("member_completion", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
