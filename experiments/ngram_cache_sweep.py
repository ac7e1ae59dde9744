"""How much the n-gram cache helps line completion, by blend weight: the sweep that chose its default.

    python experiments/ngram_cache_sweep.py [--model DIR] [--config configs/ngram_cache_sweep.yaml] [--limit N] [key=value ...]

Lines of the model's validation split (not the test split the model card reports on: the
settings are chosen here, then reported there) are cut at a random point, as the model card
cuts test lines; target = the rest of the line; greedy with token healing, batched.

Two sweeps. Each weight, with the default `skip_recent`, on two prompts: the whole file
above the cut, as an editor gives it (the model sees its last context-full of tokens, the
cache all of it), and the model card's last `card_prompt_chars` characters; weight 0 is the
runtime without the cache. Then each `skip_recent` at the default weight, whole-file prompts.
Per point: exact match, edit similarity, degenerate repetition, lines gained and lost
against weight 0 on the same prompts (exact match, with the sign test's p-value), and how
many of the model card's sample prompts loop (end by the repetition stop) within
`sample_max_new_tokens` as the CLI completes them: a cache that copies the line just
written makes greedy decoding loop, which line completion alone would not show.

Chosen: the `skip_recent` with the highest edit similarity among those whose samples loop no
more often than without the cache, and the weight with the highest edit similarity on
whole-file prompts; `earlyexit.runtime.ngram_cache.SKIP_RECENT` and `DEFAULT_WEIGHT` must equal them
(a test checks). Writes experiments/results/ngram_cache_sweep/.
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
    weights: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4])
    skip_recent: list[int] = field(default_factory=lambda: [0, 32, 64, 128])  # the weight sweep uses SKIP_RECENT
    lines: int = 600
    max_line_tokens: int = 32
    card_prompt_chars: int = 2000  # the model card's line prompts (ModelCardConfig uses line_cut_examples' default)
    split: str = "validation"
    samples_from: str = "configs/model_card.yaml"  # the model card's config: its sample prompts and their length
    threads: int = 2
    seed: int = 0
    plot: bool = True


def run(args, cfg: CacheSweepConfig) -> None:
    from earlyexit.evaluation.backbone_quality import completion_metrics, paired_exact_match
    from earlyexit.config import load_config
    from earlyexit.data.corpus import line_cut_examples, load_eval_files, model_corpus
    from earlyexit.errors import EarlyExitError
    from earlyexit.runtime.loading import load_runtime_model, resolve_model_dir
    from earlyexit.evaluation.model_card import ModelCardConfig
    from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT, SKIP_RECENT, check_skip_recent, check_weight

    if args.limit:
        cfg.lines = min(cfg.lines, args.limit)
    for w in cfg.weights:
        check_weight(w)
    for k in cfg.skip_recent:
        check_skip_recent(k)
    if 0.0 not in cfg.weights:
        raise EarlyExitError("weights must include 0 (the runtime without the cache, which the others are compared with)")
    card = load_config(ModelCardConfig, cfg.samples_from, [])
    set_threads(cfg.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_runtime_model(model_dir)
    files = load_eval_files(args.data) if args.data else model_corpus(model_dir)[0][cfg.split]
    examples = {kind: line_cut_examples(files, cfg.lines, max_prompt_chars=getattr(cfg, limit) if limit else 10 ** 12, seed=cfg.seed)
                for kind, limit in PROMPTS.items()}
    points = [("weight", kind, w, SKIP_RECENT) for kind in PROMPTS for w in cfg.weights]
    points += [("skip_recent", "whole file", DEFAULT_WEIGHT, k) for k in cfg.skip_recent]
    scored: dict[tuple, dict] = {}
    rows = []
    for sweep, kind, w, k in points:
        key = (kind, 0.0 if w == 0 else w, SKIP_RECENT if w == 0 else k)  # without the cache skip_recent does nothing
        if key not in scored:
            m = completion_metrics(model, tok, examples[kind], cfg.max_line_tokens, True, f"{kind}, weight {w:g}, skip {k}",
                                   healing=True, per_example=True, cache_weight=w, cache_skip_recent=k)
            scored[key] = {"exact_match": m["exact_match"], "edit_similarity": m["edit_similarity"], "indel_similarity": m["indel_similarity"],
                           "degenerate_rate": m["degenerate_rate"], "exact": m["exact"],
                           "sample_loops": sample_loops(model, tok, card, w, k)}
        rows.append({"sweep": sweep, "prompt": kind, "weight": w, "skip_recent": k, **scored[key]})
    for r in rows:
        r["against_no_cache"] = paired_exact_match(scored[(r["prompt"], 0.0, SKIP_RECENT)]["exact"], r["exact"])
    result = {"stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or f"{cfg.split} split"}), "lines": cfg.lines,
              "samples": len(card.sample_prompts), "default_weight": DEFAULT_WEIGHT, "default_skip_recent": SKIP_RECENT,
              "rows": rows, **chosen(rows)}
    out = write_results("ngram_cache_sweep", result, render(cfg, result))
    if cfg.plot:
        plot(result, out / "ngram_cache_sweep.png")
    print(render(cfg, result))


def sample_loops(model, tok, card, weight: float, skip_recent: int) -> int:
    """How many of the model card's sample prompts end by the repetition stop as the CLI completes them with this cache."""
    from earlyexit.runtime.decoding import GenerationSettings, complete

    settings = GenerationSettings(max_new_tokens=card.sample_max_new_tokens, token_healing=True, stop_on_repetition=True,
                                  cache_weight=weight, cache_skip_recent=skip_recent)
    return sum(complete(model, tok, p, settings).finish_reason == "repetition" for p in card.sample_prompts)


def chosen(rows: list[dict]) -> dict:
    """The settings the sweep picks (see the module's docstring): {"best_weight", "best_skip_recent"}."""
    weights = [r for r in rows if r["sweep"] == "weight" and r["prompt"] == "whole file"]
    loops_without = next(r["sample_loops"] for r in weights if r["weight"] == 0)
    skips = [r for r in rows if r["sweep"] == "skip_recent"]
    calm = [r for r in skips if r["sample_loops"] <= loops_without] or skips
    return {"best_weight": max(weights, key=lambda r: r["edit_similarity"])["weight"],
            "best_skip_recent": max(calm, key=lambda r: r["edit_similarity"])["skip_recent"] if skips else None}


def render(cfg: CacheSweepConfig, result: dict) -> str:
    lines = [
        f"{result['lines']} lines of the {cfg.split} split cut at a random point, target = the rest of the line, greedy with token "
        f"healing, at most {cfg.max_line_tokens} tokens. Prompts: the whole file above the cut (the cache searches all of it, the "
        f"model its last context-full), or the model card's last {cfg.card_prompt_chars:,} characters. Weight 0: no cache. "
        f"Sample loops: of the model card's {result['samples']} sample prompts, how many loop (the CLI's repetition stop ends them) "
        "as the CLI completes them with that cache.",
        "",
        "| sweep | prompt | weight | skip recent | exact match | edit similarity | degenerate | sample loops | "
        "exact lines gained / lost vs no cache (sign test p) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a = r["against_no_cache"]
        versus = "" if r["weight"] == 0 else f"{a['gained']} / {a['lost']} (p = {a['p_value']:.2g})"
        lines.append(f"| {r['sweep']} | {r['prompt']} | {r['weight']:g} | {r['skip_recent'] if r['weight'] else '-'} | {r['exact_match']:.1%} | "
                     f"{r['edit_similarity']:.3f} | {r['degenerate_rate']:.1%} | {r['sample_loops']} | {versus} |")
    lines += ["", f"Chosen: weight **{result['best_weight']:g}** (highest edit similarity on whole-file prompts) and skip recent "
              f"**{result['best_skip_recent']}** (highest edit similarity among those whose samples loop no more often than without "
              f"the cache). The runtime's defaults (`earlyexit.runtime.ngram_cache`): weight {result['default_weight']:g}, skip recent "
              f"{result['default_skip_recent']}.", "", "![by weight](ngram_cache_sweep.png)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for kind in PROMPTS:
        pts = [r for r in result["rows"] if r["prompt"] == kind and r["sweep"] == "weight"]
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
