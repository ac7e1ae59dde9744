"""benchmark_generate's report: one row per engine from the raw counts, the Markdown table and the speed plot.

The ratios are of median ms per token against transformers `generate`, our `full` loop and llama.cpp fp32, each
measured in the same run (a ratio is None where its baseline did not run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import percentile


def summarize(acc: dict, n_runs: int, n_layer: int) -> list[dict]:
    """One row per engine, with its ratios to transformers generate, our full depth and llama.cpp fp32 (where measured)."""
    rows = []
    for name, a in acc.items():
        rows.append({
            "engine": name, "tokens": a["tokens"], "seconds": a["seconds"], "tokens_per_s": a["tokens"] / a["seconds"],
            "median_ms_per_token": percentile(a["step_ms"], 50), "p95_ms_per_token": percentile(a["step_ms"], 95),
            "identical_to_full": a["identical"] / n_runs, "rouge_l": float(np.mean(a["rouge"])),
            "rouge_l_vs_full": float(np.mean(a["rouge_vs_full"])),
            "mean_layers": float(np.mean(a["layers"])) if a["layers"] else float(n_layer),
            "acceptance_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
            "line_exact_match": float(np.mean(a["em"])) if a["em"] else None,
            "line_edit_similarity": float(np.mean(a["es"])) if a["es"] else None,
        })
    by_name = {r["engine"]: r for r in rows}
    for key, base in (("generate", "transformers generate"), ("full", "earlyexit full"), ("llama_cpp", "llama.cpp fp32")):
        b = by_name.get(base)
        for r in rows:
            r[f"speedup_vs_{key}"] = b["median_ms_per_token"] / r["median_ms_per_token"] if b else None
            r[f"tokens_per_s_vs_{key}"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
    return rows


def ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}×"


def render(rows: list[dict], unavailable: dict, args, n_prompts: int, thresholds, memory: dict, n_layer: int) -> str:
    """results.md: what was run and how it was measured, one row per engine, one per engine that could not run."""
    if not args.prompts.isdigit():
        what = f"{n_prompts} prompts from {args.prompts}"
    elif args.task == "line":
        what = f"{n_prompts} test-split line prompts (cut inside a line's code; target: the rest of the line)"
    else:
        what = f"{n_prompts} test-split prompts (≤ {args.max_prompt_tokens} tokens; reference: the file's next {args.max_new_tokens} tokens)"
    lines = [
        f"Greedy completion of {what} × {args.repeats} repeats, up to {args.max_new_tokens} new tokens"
        + (", every engine stopping at the end of the line" if args.task == "line" else "") + f", batch 1, {args.threads} threads."
        + (f" Early-exit thresholds: exit {thresholds.exit}, stop {thresholds.stop}." if thresholds else "")
        + " Speed ratios are of median ms per token (higher is faster)."
        + (" Memory: the peak RSS an engine adds to a process that has already imported torch, transformers and the "
           "tokenizer, building the engine (weights included) and completing one prompt, one process per engine "
           f"(building nothing adds {memory['baseline']:.0f} MB)." if memory.get("baseline") is not None else ""),
        "",
        "| engine | tokens/s | median ms/token | p95 ms/token | × generate | × earlyexit full | × llama.cpp fp32 | identical to full | "
        f"ROUGE-L vs reference | ROUGE-L vs full | line EM | line edit sim. | mean layers (of {n_layer}) | drafts accepted | memory added MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accepted = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
        rss = f"{r['memory_added_mb']:.0f}" if r.get("memory_added_mb") is not None else "-"
        em = "-" if r["line_exact_match"] is None else f"{r['line_exact_match']:.1%}"
        es = "-" if r["line_edit_similarity"] is None else f"{r['line_edit_similarity']:.3f}"
        lines.append(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['median_ms_per_token']:.2f} | {r['p95_ms_per_token']:.2f} | "
                     f"{ratio(r['speedup_vs_generate'])} | {ratio(r['speedup_vs_full'])} | {ratio(r['speedup_vs_llama_cpp'])} | "
                     f"{r['identical_to_full']:.0%} | {r['rouge_l']:.3f} | {r['rouge_l_vs_full']:.3f} | {em} | {es} | {r['mean_layers']:.2f} | "
                     f"{accepted} | {rss} |")
    for name, why in unavailable.items():
        lines.append(f"| {name} | not run: {why} |" + " |" * 14)
    lines += ["", "![median ms per token by engine](ms_per_token.png)"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    names = [r["engine"] for r in rows][::-1]
    med = [r["median_ms_per_token"] for r in rows][::-1]
    p95 = [r["p95_ms_per_token"] for r in rows][::-1]
    ax.barh(names, p95, color="lightgray", label="p95")
    ax.barh(names, med, color="tab:blue", label="median")
    for y, (m, r) in enumerate(zip(med, rows[::-1])):
        ax.text(m, y, f" {m:.2f} ms ({r['speedup_vs_generate']:.2f}× generate)", va="center", fontsize=8)
    ax.set_xlabel("ms per generated token (batch 1)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Greedy decoding speed, same prompts, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
