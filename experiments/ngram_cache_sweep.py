"""How much the n-gram cache helps line completion, by blend weight: the sweep that chose its default.

    python experiments/ngram_cache_sweep.py [--model DIR] [--config configs/ngram_cache_sweep.yaml] [--limit N] [key=value ...]

Lines of the model's validation split (not the test split the model card reports on: the
weight is chosen here, then reported there) are cut at a random point, as the model card
cuts test lines; target = the rest of the line; greedy with token healing, batched. Each
weight is scored with two prompts: the whole file above the cut, as an editor gives it
(the model sees its last context-full of tokens, the cache all of it), and the model card's
last `card_prompt_chars` characters. Weight 0 is the runtime without the cache. Per point:
exact match, edit similarity, degenerate repetition, and lines gained and lost against
weight 0 on the same prompt (exact match, with the sign test's p-value). The best weight is
the one with the highest edit similarity on whole-file prompts; `earlyexit.ngram_cache.
DEFAULT_WEIGHT` must equal it (a test checks). Writes experiments/results/ngram_cache_sweep/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_main, set_threads, stamp, write_results  # noqa: E402

PROMPTS = {"whole file": None, "card": "card_prompt_chars"}  # prompt kind -> the config field limiting its characters


@dataclass
class CacheSweepConfig:
    weights: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    lines: int = 600
    max_line_tokens: int = 32
    card_prompt_chars: int = 2000  # the model card's line prompts (ModelCardConfig uses line_cut_examples' default)
    split: str = "validation"
    threads: int = 2
    seed: int = 0
    plot: bool = True


def run(args, cfg: CacheSweepConfig) -> None:
    from earlyexit.backbone_quality import completion_metrics, paired_exact_match
    from earlyexit.data import line_cut_examples, load_eval_files, model_corpus
    from earlyexit.errors import EarlyExitError
    from earlyexit.loading import load_runtime_model, resolve_model_dir
    from earlyexit.ngram_cache import check_weight

    if args.limit:
        cfg.lines = min(cfg.lines, args.limit)
    for w in cfg.weights:
        check_weight(w)
    if 0.0 not in cfg.weights:
        raise EarlyExitError("weights must include 0 (the runtime without the cache, which the others are compared with)")
    set_threads(cfg.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_runtime_model(model_dir)
    files = load_eval_files(args.data) if args.data else model_corpus(model_dir)[0][cfg.split]
    rows = []
    for kind, limit in PROMPTS.items():
        chars = getattr(cfg, limit) if limit else 10 ** 12
        examples = line_cut_examples(files, cfg.lines, max_prompt_chars=chars, seed=cfg.seed)
        by_weight = {}
        for w in cfg.weights:
            by_weight[w] = completion_metrics(model, tok, examples, cfg.max_line_tokens, True, f"{kind}, weight {w:g}", healing=True,
                                              per_example=True, cache_weight=w)
        for w, m in by_weight.items():
            rows.append({"prompt": kind, "weight": w, "exact_match": m["exact_match"], "edit_similarity": m["edit_similarity"],
                         "indel_similarity": m["indel_similarity"], "degenerate_rate": m["degenerate_rate"], "exact": m["exact"],
                         "against_no_cache": paired_exact_match(by_weight[0.0]["exact"], m["exact"])})
    whole = [r for r in rows if r["prompt"] == "whole file"]
    best = max(whole, key=lambda r: r["edit_similarity"])["weight"]
    result = {"stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or f"{cfg.split} split"}), "lines": cfg.lines,
              "rows": rows, "best_weight": best}
    out = write_results("ngram_cache_sweep", result, render(cfg, result))
    if cfg.plot:
        plot(result, out / "ngram_cache_sweep.png")
    print(render(cfg, result))


def render(cfg: CacheSweepConfig, result: dict) -> str:
    lines = [
        f"{result['lines']} lines of the {cfg.split} split cut at a random point, target = the rest of the line, greedy with token "
        f"healing, at most {cfg.max_line_tokens} tokens. Prompts: the whole file above the cut (the cache searches all of it, the "
        f"model its last context-full), or the model card's last {cfg.card_prompt_chars:,} characters. Weight 0: no cache.",
        "",
        "| prompt | weight | exact match | edit similarity | degenerate | exact lines gained / lost vs weight 0 (sign test p) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a = r["against_no_cache"]
        versus = "" if r["weight"] == 0 else f"{a['gained']} / {a['lost']} (p = {a['p_value']:.2g})"
        lines.append(f"| {r['prompt']} | {r['weight']:g} | {r['exact_match']:.1%} | {r['edit_similarity']:.3f} | "
                     f"{r['degenerate_rate']:.1%} | {versus} |")
    lines += ["", f"Highest edit similarity on whole-file prompts: weight **{result['best_weight']:g}** "
              "(`earlyexit.ngram_cache.DEFAULT_WEIGHT`, the CLI's default).", "", "![by weight](ngram_cache_sweep.png)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for kind in PROMPTS:
        pts = [r for r in result["rows"] if r["prompt"] == kind]
        for ax, measure in zip(axes, ("exact_match", "edit_similarity")):
            ax.plot([r["weight"] for r in pts], [r[measure] for r in pts], marker="o", label=f"{kind} prompt")
            ax.set_xlabel("n-gram cache weight")
            ax.set_ylabel(measure.replace("_", " "))
    axes[1].axvline(result["best_weight"], color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("Line completion by n-gram cache weight (validation split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return experiment_main(argv, __doc__, CacheSweepConfig, run, "quick run: at most this many lines")


if __name__ == "__main__":
    sys.exit(main())
