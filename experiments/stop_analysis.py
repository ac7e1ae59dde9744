"""Stop decisions, measured: when the controller halts a completion, was the unwritten rest wrong?

    python experiments/stop_analysis.py [--model DIR] [--config configs/stop_analysis.yaml] [--limit N] [key=value ...]

For test-split prompts cut at a random token, the full model's greedy completion F (up
to `max_new_tokens`) is compared token by token with the reference R (the file's next
tokens). Then, for each stop threshold with exiting off (so the tokens written are F's
until the stop), the completion keeps its first s tokens. Per threshold:

- precision: of stopped completions, the share whose unwritten rest F[s:] holds a wrong
  token (strict: the very next token F[s] was wrong);
- recall: of completions whose F holds a wrong token, the share that were stopped; clean
  recall: stopped at or before the first wrong token, so the kept part is all right;
- tokens saved: the share of F's tokens never written;
- acceptance proxy (the study's claim that stopping turns discarded completions into
  accepted ones): a completion counts as acceptable when it is non-empty and every
  token is right; the rate without stopping (F) against with stopping (the kept part),
  and how many wrong completions became acceptable.
Writes experiments/results/stop_analysis/ (JSON, Markdown, PNG).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_main, set_threads, stamp, test_split_files, write_results  # noqa: E402


@dataclass
class StopConfig:
    stop_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999])
    prompts: int = 200
    max_new_tokens: int = 16
    max_prompt_tokens: int = 256
    threads: int = 2
    batch_size: int = 16
    seed: int = 1


def first_wrong(tokens: list[int], ref: list[int]) -> int | None:
    """Index of the first token that differs from the reference (running past it counts as wrong)."""
    for i, t in enumerate(tokens):
        if i >= len(ref) or t != ref[i]:
            return i
    return None


def stop_stats(full: list[list[int]], refs: list[list[int]], kept: list[list[int]], stopped: list[bool]) -> dict:
    """Every figure of one threshold from the full completions, references, kept parts and stop flags."""
    wrong_at = [first_wrong(f, r) for f, r in zip(full, refs)]
    n_stopped = sum(stopped)
    # the unwritten rest F[s:] is wrong when F holds any wrong token: at or after s it is in the rest,
    # before s the rest follows a divergence from the reference
    rest_wrong = [s and w is not None for s, w in zip(stopped, wrong_at)]
    next_wrong = [s and len(k) < len(f) and (len(k) >= len(r) or f[len(k)] != r[len(k)]) for s, k, f, r in zip(stopped, kept, full, refs)]
    clean = [s and w is not None and w >= len(k) for s, w, k in zip(stopped, wrong_at, kept)]
    n_wrong = sum(w is not None for w in wrong_at)
    acceptable_full = [bool(f) and w is None for f, w in zip(full, wrong_at)]
    acceptable_kept = [bool(k) and (w is None or w >= len(k)) for k, w in zip(kept, wrong_at)]
    return {
        "stopped": n_stopped / len(full),
        "precision": sum(rest_wrong) / n_stopped if n_stopped else None,
        "strict_precision": sum(next_wrong) / n_stopped if n_stopped else None,
        "recall": sum(rest_wrong) / n_wrong if n_wrong else None,
        "clean_recall": sum(clean) / n_wrong if n_wrong else None,
        "tokens_saved": 1 - sum(map(len, kept)) / max(1, sum(map(len, full))),
        "acceptable_without_stop": float(np.mean(acceptable_full)),
        "acceptable_with_stop": float(np.mean(acceptable_kept)),
        "turned_acceptable": int(sum(k and not f for k, f in zip(acceptable_kept, acceptable_full))),
        "empty_after_stop": float(np.mean([not k for k in kept])),
        "mean_kept_tokens": float(np.mean(list(map(len, kept)))),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["threshold"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("precision", "precision (rest wrong)"), ("strict_precision", "strict precision (next token wrong)"),
                       ("recall", "recall"), ("clean_recall", "clean recall"), ("tokens_saved", "tokens saved")):
        a.plot(x, [r[key] if r[key] is not None else np.nan for r in rows], marker="o", label=label)
    a.set_xlabel("stop threshold")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    a.set_title("Stop decisions")
    b.plot(x, [r["acceptable_with_stop"] for r in rows], marker="o", label="with stopping (kept part)")
    b.plot(x, [r["acceptable_without_stop"] for r in rows], linestyle="--", label="without stopping")
    b.set_xlabel("stop threshold")
    b.set_ylabel("non-empty and all tokens right")
    b.legend(fontsize=7)
    b.set_title("Acceptance proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return experiment_main(argv, __doc__, StopConfig, run, "quick run: at most this many prompts")


def run(args, cfg: StopConfig) -> None:
    from tqdm import tqdm

    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.decoding import GenerationSettings
    from earlyexit.runtime.heads import Thresholds, load_heads
    from earlyexit.runtime.loading import load_runtime_model, resolve_model_dir
    from earlyexit.runtime.policies import EarlyExit

    if args.limit:
        cfg.prompts = min(cfg.prompts, args.limit)
    set_threads(cfg.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_runtime_model(model_dir)
    heads = load_heads(model_dir, model)
    policies = {t: EarlyExit(model, heads, Thresholds(exit=1.0, stop=t)) for t in cfg.stop_thresholds}
    examples = token_cut_examples(test_split_files(model_dir, args.data), tok, cfg.prompts, target_tokens=cfg.max_new_tokens,
                                  max_prompt_tokens=cfg.max_prompt_tokens, seed=cfg.seed)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    prompts = [tok.encode(ex.prompt) for ex in examples]
    refs = [tok.encode(ex.target)[:cfg.max_new_tokens] for ex in examples]
    full, kept, stopped = [], {t: [] for t in policies}, {t: [] for t in policies}
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="prompts"):  # batched: equal to one at a time, row for row
        chunk = prompts[i:i + cfg.batch_size]
        full += [c.token_ids for c in complete_batch(model, tok, chunk, settings)]
        for t, policy in policies.items():
            for c in complete_batch(model, tok, chunk, settings, policy=policy):
                kept[t].append(c.token_ids)
                stopped[t].append(c.finish_reason == "stop")
    diverged = sum(k != f[:len(k)] for t in policies for k, f in zip(kept[t], full))
    rows = [{"threshold": t, **stop_stats(full, refs, kept[t], stopped[t])} for t in policies]
    chosen = heads.cfg.thresholds.stop
    result = {"stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or "test split"}), "prompts": len(examples),
              "chosen_stop_threshold": chosen,
              "full_completions_with_a_wrong_token": float(np.mean([first_wrong(f, r) is not None for f, r in zip(full, refs)])),
              "kept_parts_differing_from_full": diverged, "rows": rows}
    out = write_results("stop_analysis", result, "")
    plot(rows, out / "stop_analysis.png")
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [
        f"{len(examples)} test-split prompts cut at a random token, up to {cfg.max_new_tokens} greedy tokens, exiting off "
        f"(the kept tokens are the full model's: {diverged} kept parts differed). Without stopping, "
        f"{result['full_completions_with_a_wrong_token']:.1%} of completions hold a wrong token. The heads' chosen stop threshold: {chosen:g}.",
        "", "| stop threshold | stopped | precision (rest wrong) | strict precision (next wrong) | recall | clean recall | tokens saved | "
        "acceptable without stop | acceptable with stop | turned acceptable | empty after stop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['threshold']:g}{' (chosen)' if r['threshold'] == chosen else ''} | {pct(r['stopped'])} | {pct(r['precision'])} | "
          f"{pct(r['strict_precision'])} | {pct(r['recall'])} | {pct(r['clean_recall'])} | {pct(r['tokens_saved'])} | "
          f"{pct(r['acceptable_without_stop'])} | {pct(r['acceptable_with_stop'])} | {r['turned_acceptable']} | {pct(r['empty_after_stop'])} |"
          for r in rows],
        "", "![stop decisions and acceptance](stop_analysis.png)",
    ]
    write_results("stop_analysis", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
