"""The study's RQ2 on our controller: how many layers each threshold skips, how much faster, at what quality.

    python experiments/threshold_sweep.py [--model DIR] [--config configs/threshold_sweep.yaml] [--limit N] [key=value ...]

Points: every exit threshold with stopping off, every stop threshold with exiting off, and
the heads' chosen pair. Each test-split prompt (a file cut at a random token, as in the
study) is completed greedily by `full` and by every point in turn, interleaved, after
warm-up, `repeats` times. Per point: mean layers used and skipped, median over repeats of
the decode time per token and its ratio to `full` measured in the same run, how many
completions the controller stopped, and ROUGE-L / exact match / edit similarity of the
written text against the reference (the file's next tokens) and against `full`'s
completion. Writes experiments/results/threshold_sweep/ (JSON, the study-form table,
a Pareto plot of speed against ROUGE-L).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_main, load_model_and_heads, our_engine, set_threads, stamp, test_split_files, write_results  # noqa: E402

STUDY = {"layers_skipped": 1.7, "n_layer": 16, "speedup": 0.112, "rouge_l_change": -0.011}
STUDY_GRID = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]


@dataclass
class SweepConfig:
    exit_thresholds: list[float] = field(default_factory=lambda: list(STUDY_GRID))
    stop_thresholds: list[float] = field(default_factory=lambda: STUDY_GRID[:-1])
    prompts: int = 40
    max_new_tokens: int = 32
    max_prompt_tokens: int = 256
    repeats: int = 3
    warmup: int = 2
    threads: int = 2
    seed: int = 0


def sweep_points(cfg: SweepConfig, chosen) -> list[tuple[str, float, float]]:
    """(label, exit, stop) for every point: the exit sweep, the stop sweep, and the heads' chosen pair."""
    from earlyexit.runtime.heads import Thresholds

    points = [(f"exit {e:g}" if e < 1 else "exit off", e, 1.0) for e in cfg.exit_thresholds]
    points += [(f"stop {s:g}", 1.0, s) for s in cfg.stop_thresholds if s < 1]
    points.append((f"chosen (exit {chosen.exit:g}, stop {chosen.stop:g})", chosen.exit, chosen.stop))
    for _, e, s in points:
        Thresholds(e, s)  # validates: a threshold outside [0, 1] is refused before anything runs
    return points


def quality(texts: list[str], refs: list[str], full_texts: list[str]) -> dict:
    from earlyexit.evaluation.metrics import edit_similarity, exact_match, rouge_l

    return {
        "rouge_l": float(np.mean([rouge_l(t, r) for t, r in zip(texts, refs)])),
        "exact_match": float(np.mean([exact_match(t, r) for t, r in zip(texts, refs)])),
        "edit_similarity": float(np.mean([edit_similarity(t, r) for t, r in zip(texts, refs)])),
        "rouge_l_vs_full": float(np.mean([rouge_l(t, f) if f else float(t == f) for t, f in zip(texts, full_texts)])),
    }


def measure(engines: dict, prompts: list[list[int]], cfg: SweepConfig) -> dict:
    """Run every engine on every prompt, interleaved, `repeats` times: per engine, per repeat ms/token; and outputs."""
    from tqdm import tqdm

    for ids in prompts[:cfg.warmup]:
        for run in engines.values():
            run(ids, cfg.max_new_tokens)
    acc = {name: {"ms": [], "outputs": []} for name in engines}
    for r in tqdm(range(cfg.repeats), desc="repeats"):
        spent = {name: [0.0, 0] for name in engines}
        for ids in tqdm(prompts, desc=f"prompts (repeat {r + 1})", leave=False):
            for name, run in engines.items():
                tokens, _, token_ms, completion = run(ids, cfg.max_new_tokens)
                spent[name][0] += sum(token_ms)
                spent[name][1] += len(token_ms)
                if r == 0:
                    acc[name]["outputs"].append(completion)
        for name, (ms, n) in spent.items():
            acc[name]["ms"].append(ms / n if n else float("nan"))
    return acc


def pareto(rows: list[dict], full_rouge: float) -> list[str]:
    """Points that neither another point nor `full` (speed 1, its ROUGE-L) beats on both speed and ROUGE-L."""
    rows_and_full = [*rows, {"point": "full", "speedup": 1.0, "rouge_l": full_rouge}]
    return [r["point"] for r in rows if not any(
        o["speedup"] >= r["speedup"] and o["rouge_l"] >= r["rouge_l"] and (o["speedup"] > r["speedup"] or o["rouge_l"] > r["rouge_l"])
        for o in rows_and_full)]


def plot(rows: list[dict], full: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, marker in (("exit", "o"), ("stop", "s"), ("chosen", "*")):
        pts = [r for r in rows if r["point"].startswith(kind)]
        ax.scatter([r["speedup"] for r in pts], [r["rouge_l"] for r in pts], marker=marker, s=80 if kind == "chosen" else 36,
                   label={"exit": "exit sweep (stop off)", "stop": "stop sweep (exit off)", "chosen": "heads' chosen pair"}[kind])
        for r in pts:
            ax.annotate(r["point"].split(" (")[0].replace("exit ", "").replace("stop ", "s"), (r["speedup"], r["rouge_l"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["speedup"])
    ax.plot([r["speedup"] for r in front], [r["rouge_l"] for r in front], color="gray", linewidth=1, label="Pareto front")
    ax.scatter([1.0], [full["rouge_l"]], marker="D", color="black", label="full")
    ax.axvline(1.0, color="lightgray", linewidth=0.8)
    ax.set_xlabel("decode speed vs full (× per token, same run)")
    ax.set_ylabel("ROUGE-L vs reference")
    ax.set_title("Threshold sweep: speed against quality")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return experiment_main(argv, __doc__, SweepConfig, run, "quick run: at most this many prompts, one repeat, no warm-up")


def engines_for(model, tok, heads, points) -> dict:
    """`full` and one early-exit runner per point, under the study's exit rule (the controller's)."""
    from earlyexit.runtime.heads import Thresholds
    from earlyexit.runtime.policies import EarlyExit, FullDepth

    engines = {"full": our_engine(model, tok, FullDepth())}
    for label, e, s in points:
        engines[label] = our_engine(model, tok, EarlyExit(model, heads, Thresholds(e, s), exit_rule="controller"))  # the study's rule
    return engines


def score_points(points, acc: dict, refs: list[str], L: int) -> tuple[dict, list[dict]]:
    """`full`'s speed and quality, and one row per point against it, each marked whether it is on the Pareto front."""
    full_outputs = acc["full"]["outputs"]
    full_texts = [c.text for c in full_outputs]
    full_ms = float(np.median(acc["full"]["ms"]))
    full = {"ms_per_token": full_ms, **quality(full_texts, refs, full_texts)}
    rows = []
    for label, e, s in points:
        outs = acc[label]["outputs"]
        layers = [layer for c in outs for layer in c.exit_layers]
        ms = float(np.median(acc[label]["ms"]))
        q = quality([c.text for c in outs], refs, full_texts)
        rows.append({
            "point": label, "exit_threshold": e, "stop_threshold": s,
            "mean_layers": float(np.mean(layers)) if layers else float(L), "layers_skipped": L - (float(np.mean(layers)) if layers else L),
            "ms_per_token": ms, "ms_per_token_repeats": acc[label]["ms"], "speedup": full_ms / ms,
            "stopped": float(np.mean([c.finish_reason == "stop" for c in outs])),
            "tokens_written": int(sum(len(c.token_ids) for c in outs)),
            "identical_to_full": float(np.mean([c.token_ids == f.token_ids for c, f in zip(outs, full_outputs)])),
            **q, "rouge_l_change": q["rouge_l"] / full["rouge_l"] - 1 if full["rouge_l"] else float("nan"),
        })
    front = set(pareto(rows, full["rouge_l"]))
    for r in rows:
        r["pareto"] = r["point"] in front
    return full, rows


def table(rows: list[dict], full: dict, cfg: SweepConfig, n_prompts: int, L: int) -> str:
    """The study-form table: one line for `full`, one per point, and the Pareto plot."""
    lines = [
        f"{n_prompts} test-split prompts cut at a random token, up to {cfg.max_new_tokens} greedy tokens, batch 1, {cfg.threads} threads; "
        f"time per decoded token is the median of {cfg.repeats} interleaved repeats; `full` takes {full['ms_per_token']:.2f} ms/token "
        "in the same run.",
        "", f"In the study's form (study: {STUDY['layers_skipped']}/{STUDY['n_layer']} layers skipped, {STUDY['speedup']:+.1%} speed, "
        f"{STUDY['rouge_l_change']:+.1%} ROUGE-L):", "",
        f"| point | layers skipped (of {L}) | speed vs full | ROUGE-L change | ROUGE-L | exact match | edit sim. | "
        "ROUGE-L vs full | identical to full | stopped | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| full | 0.00 | 1.00× | - | {full['rouge_l']:.3f} | {full['exact_match']:.1%} | {full['edit_similarity']:.3f} | 1.000 | 100% | 0% | |",
    ]
    for r in rows:
        lines.append(f"| {r['point']} | {r['layers_skipped']:.2f} | {r['speedup']:.2f}× | {r['rouge_l_change']:+.1%} | {r['rouge_l']:.3f} | "
                     f"{r['exact_match']:.1%} | {r['edit_similarity']:.3f} | {r['rouge_l_vs_full']:.3f} | {r['identical_to_full']:.0%} | "
                     f"{r['stopped']:.0%} | {'✓' if r['pareto'] else ''} |")
    lines += ["", "![speed against ROUGE-L](pareto.png)"]
    return "\n".join(lines)


def run(args, cfg: SweepConfig) -> None:
    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.loading import resolve_model_dir

    if args.limit:
        cfg.prompts, cfg.repeats, cfg.warmup = min(cfg.prompts, args.limit), 1, 0
    set_threads(cfg.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok, heads = load_model_and_heads(model_dir)
    points = sweep_points(cfg, heads.cfg.thresholds)
    engines = engines_for(model, tok, heads, points)
    examples = token_cut_examples(test_split_files(model_dir, args.data), tok, cfg.prompts, target_tokens=cfg.max_new_tokens,
                                  max_prompt_tokens=cfg.max_prompt_tokens, seed=cfg.seed)
    prompts = [tok.encode(ex.prompt) for ex in examples]
    acc = measure(engines, prompts, cfg)
    L = model.dims.n_layer
    full, rows = score_points(points, acc, [ex.target for ex in examples], L)
    full_outputs = acc["full"]["outputs"]
    result = {"stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or "test split"}), "n_layer": L, "prompts": len(prompts),
              "full": {**full, "ms_per_token_repeats": acc["full"]["ms"], "tokens_written": int(sum(len(c.token_ids) for c in full_outputs))},
              "rows": rows, "study": STUDY}
    out = write_results("threshold_sweep", result, "")
    plot(rows, full, out / "pareto.png")
    text = table(rows, full, cfg, len(prompts), L)
    write_results("threshold_sweep", result, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
