"""The model card's Markdown, from an evaluation's result (the dict `evaluate` returns and eval.json keeps).

`render_card` reads as the card does, one phase per section: the introduction, the data, the recipe, held-out
quality, where line completions go wrong, the training curve, the quality curve (`card_evidence`), the issue's
targets, the samples and the limits. Every figure comes from the result: nothing here measures.
"""

from __future__ import annotations

from .backbone_quality import TARGET_LINE_COMPLETION, TARGET_VALIDATION_LOSS
from .card_evidence import curve_lines, sweep_lines, throughput_lines
from .card_plot import curve_segments
from .recipe import schedule_lines


def source_list(sources: list[str], stats: dict) -> str:
    """The sources with the versions they were read at, where the corpus recorded them."""
    from ..data.corpus import source_name

    versions = stats.get("source_versions", {})
    return ", ".join(f"{s} {versions[source_name(s)]}".rstrip() if versions.get(source_name(s)) else s for s in sources)


def code_cell(text: str) -> str:
    """`text` as code in a Markdown table cell."""
    if not text.strip():
        return "*(nothing)*"
    text = text.replace("|", "\\|")  # GitHub's tables split cells at a bare pipe, even inside code
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def line_error_lines(lc: dict) -> list[str]:
    """Where the healed line completions part from their targets, and the first few as scored (cards written before
    the breakdown have neither)."""
    b, shown = lc.get("breakdown"), lc.get("shown_examples", [])
    if not b:
        return []
    out = ["### Where line completions go wrong", "",
           f"Of the {lc['examples']} healed line completions: {b['exact']:.0%} exact; {b['stopped_short']:.0%} stop short (a prefix of "
           f"the target); {b['ran_on']:.0%} write the target and run on; {b['diverged']:.0%} go wrong inside it. On average a completion "
           f"writes {b['target_share_right_before_first_error']:.0%} of the target's characters before its first mistake.", ""]
    if shown:
        out += [f"The first {len(shown)} lines as scored: the prompt's last line up to the cut, the rest of the line, the model's completion.", "",
                "| prompt's last line | target | completion | edit similarity |", "|---|---|---|---|"]
        out += [f"| {code_cell(e['prompt_line'].lstrip())} | {code_cell(e['target'].rstrip())} | {code_cell(e['prediction'].rstrip())} | "
                f"{e['edit_similarity']:.2f}{' (exact)' if e['exact'] else ''} |" for e in shown]
        out += [""]
    return out


def completion_row(label: str, m: dict) -> str:
    return (f"| {label} | {m['examples']} | {m['exact_match']:.1%} | {m['edit_similarity']:.3f} | {m['rouge_l']:.3f} | "
            f"{m['degenerate_rate']:.1%} |")


def cache_rows(r: dict) -> list[str]:
    """The line completion rows with the n-gram cache (cards written before it have none)."""
    if "line_completion_cached" not in r:
        return []
    w = r["config"]["cache_weight"]
    return [completion_row(f"the same lines with the n-gram cache (weight {w:g}, the CLI's default)", r["line_completion_cached"]),
            completion_row("the same cuts, the whole file above each as the prompt: token healing", r["line_completion_whole_file_no_cache"]),
            completion_row("the same, with the n-gram cache: the CLI's defaults on a file in an editor", r["line_completion_whole_file"])]


def cache_note(r: dict) -> list[str]:
    if "line_completion_cached" not in r:
        return []
    return ["", "The n-gram cache (`earlyexit.runtime.ngram_cache`, on by default in the CLI) blends into the model's next-token "
            "distribution what followed the longest earlier copy of the last tokens in the prompt; its weight was chosen on "
            "validation lines (`experiments/ngram_cache_sweep.py`). The line prompts above are the last 2,000 characters before "
            "each cut; in an editor the whole file above the cursor is at hand: the model still sees its last context-full "
            "of tokens, the cache searches all of it (`--truncate-prompt`)."]


def cache_target_rows(r: dict) -> list[str]:
    if "line_completion_whole_file" not in r:
        return []
    m = r["line_completion_whole_file"]
    return [f"| the same with the CLI's n-gram cache, whole file above the cut: exact match | ≥ {TARGET_LINE_COMPLETION['exact_match']:.0%} | "
            f"{m['exact_match']:.1%} |",
            f"| the same: edit similarity | ≥ {TARGET_LINE_COMPLETION['edit_similarity']:.2f} | {m['edit_similarity']:.3f} |"]



def intro_lines(r: dict) -> list[str]:
    tc = r["training"]["config"]
    return [
        "# earlyexit default model",
        "",
        f"A {tc['n_layer']}-layer, {tc['n_embd']}-wide GPT-2 ({r['parameters'] / 1e6:.1f}M parameters, "
        f"{tc['vocab_size']:,}-token byte-level BPE) trained from scratch on local Python source by "
        "`earlyexit.training.train_lm`. It ships inside the package so `python -m earlyexit.generate` works with no download, "
        "and loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. "
        f"Weights in fp16 safetensors: {r['disk_bytes'] / 1e6:.1f} MB on disk.",
        "",
        f"Every figure below was written by `python -m earlyexit.evaluation.model_card` at commit `{r['commit']}` on {r['machine']}.",
        "",
    ]


def data_lines(r: dict) -> list[str]:
    """The corpus: its sources, what was skipped or dropped, the split and the hash that pins the file list."""
    tc, stats, tokens = r["training"]["config"], r["corpus"]["stats"], r["corpus"]["tokens"]
    return [
        "## Data",
        f"- Sources: {source_list(tc['sources'], stats)} (the standard library and the installed packages' own `.py` files, read from disk).",
        f"- {stats['files_seen']:,} files seen; {stats['non_utf8_skipped']} not UTF-8 and {stats['too_large_skipped']} over 1 MB skipped; "
        f"{stats['duplicates_skipped']} exact duplicates dropped (content hash)"
        + (f", {stats['near_duplicates_dropped']} test files dropped as near-duplicates of train/validation files (most distinctive lines shared)"
           if "near_duplicates_dropped" in stats else "")
        + (f", {stats['train_near_duplicates_dropped']:,} training and {stats['validation_near_duplicates_dropped']:,} validation files dropped "
           "as near-duplicates of earlier training files" if stats.get("train_near_duplicates_dropped") else "")
        + f"; {stats['kept']:,} kept, {stats['bytes_kept'] / 1e6:.0f} MB.",
        f"- Split by a hash of each file's path: train {stats['per_split']['train']:,} files ({tokens['train'] / 1e6:.1f}M tokens), "
        f"validation {stats['per_split']['validation']} ({tokens['validation'] / 1e6:.2f}M), test {stats['per_split']['test']} files.",
        "- File list hash (sha256 of the `path<TAB>content-sha256` lines of train, validation and test, each sorted by path): "
        f"`{stats['file_list_sha256']}`.",
        "",
    ]


def recipe_lines(r: dict) -> list[str]:
    """How the model was trained, phase by phase, with the experiments' evidence for the choices."""
    tc = r["training"]["config"]
    return [
        "## Recipe",
        f"- {r['training']['step']:,} steps, the last phase's of {tc['batch_size']} × {tc['seq_len']} tokens (× {tc['grad_accum']} accumulation): "
        f"**{r['training']['tokens_seen'] / 1e6:.1f}M tokens seen**. Context: {tc['seq_len']} tokens, the last phase's window "
        "(position embeddings past it never trained, so the export drops them).",
        f"- AdamW (fused, betas 0.9/0.95, weight decay {tc['weight_decay']}), gradient clip {tc['grad_clip']}; bf16 autocast: {tc['bf16']}; "
        f"`torch.compile`: {tc['compile']}.",
        *schedule_lines(tc),
        f"- Then copy `{tc['out_dir']}/` into `earlyexit/default_model/` and run "
        "`python -m earlyexit.evaluation.model_card --model earlyexit/default_model` (the export carries the validation curve of every phase).",
        *throughput_lines(r.get("train_throughput")),
        *sweep_lines(r.get("recipe_sweep"), r.get("vocab_sweep"), r.get("schedule_sweep")),
    ]


def held_out_lines(r: dict) -> list[str]:
    """Loss and top-1 per split, then the completion tasks on the test split."""
    v, t, lc, kc = r["validation"], r["test"], r["line_completion"], r["token_completion"]
    raw = r["line_completion_no_healing"]
    one = r.get("line_completion_one_token_healing")  # cards written before multi-token healing lack it
    return [
        "",
        "## Held-out quality",
        f"Loss and top-1 over {r['config']['loss_windows']} evenly spaced windows of {r['config']['seq_len']} tokens per split.",
        "",
        "| split | loss (nats/token) | perplexity | next-token top-1 | tokens scored |",
        "|---|---|---|---|---|",
        f"| validation | {v['loss']:.3f} | {v['perplexity']:.1f} | {v['top1']:.1%} | {v['tokens']:,} |",
        f"| test | {t['loss']:.3f} | {t['perplexity']:.1f} | {t['top1']:.1%} | {t['tokens']:,} |",
        "",
        "| completion task (test split, greedy) | examples | exact match | edit similarity | ROUGE-L | degenerate repetition |",
        "|---|---|---|---|---|---|",
        completion_row("line: random point inside a line, target = rest of the line, token healing", lc),
        *([completion_row("the same lines, healing only the last token (the quality curve's measure)", one)] if one else []),
        *cache_rows(r),
        completion_row("the same lines without token healing", raw),
        completion_row(f"the study's: random token, target = next {r['config']['target_tokens']} tokens", kc),
        "",
        "Line prompts are cut at a random character, often inside a word. Token healing (on by default in the CLI) backs off "
        "the prompt's partial word (the longest run of last tokens some single token starts with) and makes the first "
        "generated token extend it; the rows below the first show what backing off one token only, or nothing, gives.",
        *cache_note(r),
        "",
    ]


def figure_lines(r: dict, has_plot: bool) -> list[str]:
    """The training curve's figure, and where the corpus changed under it."""
    if not has_plot:
        return []
    lines = ["![validation curve](training_curve.png)", ""]
    segments = curve_segments(r["training"].get("curve", []))
    if len(segments) > 1:
        lines += ["The corpus, and with it the validation split, changed "
                  + ", ".join(f"after step {before[-1]['step']:,} (`{old}` → `{new}`)" for (old, before), (new, _) in zip(segments, segments[1:]))
                  + ": validation losses on either side of a break do not compare; the test-split curve below does.", ""]
    return lines


def target_lines(r: dict) -> list[str]:
    """This model against the targets of issue #6, with the horizon's measure named beside the issue's."""
    v, lc, samples = r["validation"], r["line_completion"], r["samples"]
    n = len(samples)
    return ["## Against the targets of issue #6", "", "| measure | target | this model |", "|---|---|---|",
            f"| validation loss (nats/token) | ≤ {TARGET_VALIDATION_LOSS:.1f} | {v['loss']:.3f} |",
            f"| line completion exact match (healed) | ≥ {TARGET_LINE_COMPLETION['exact_match']:.0%} | {lc['exact_match']:.1%} |",
            f"| line completion edit similarity (healed) | ≥ {TARGET_LINE_COMPLETION['edit_similarity']:.2f} | {lc['edit_similarity']:.3f} |",
            *cache_target_rows(r),
            f"| sample completions with degenerate repetition, the model alone | 0 of {n} | {sum(s['degenerate'] for s in samples)} of {n} |",
            f"| the same, as the CLI writes them (n-gram cache and repetition stop on) | 0 of {n} | "
            f"{sum(s['cli_degenerate'] for s in samples)} of {n} |", "",
            *([f"Edit similarity here is 1 - Levenshtein distance / longer length. The horizon the issue names (CodeGPT-small-py "
               f"on PY150, 39% / 71) is scored by CodeXGLUE's evaluator with an insert/delete-only ratio, 2 · LCS / total "
               f"length, which credits a partly right line more: on that ratio these healed lines score "
               f"{lc['indel_similarity']:.3f}. It is not the issue's measure, and the two tasks still differ (CodeXGLUE "
               f"scores space-separated tokens with string and number literals replaced by placeholders; here, raw text).", ""]
              if "indel_similarity" in lc else []),
            # the check sees only short cycles; the repetition stop's wider one (a line, block or phrase
            # repeated) is what a reader sees in the samples below, so the card counts both
            f"Looping in the wider sense of the CLI's repetition stop (a line, a block or a phrase written again), "
            f"{sum(s['cli_finish'] == 'repetition' for s in samples)} of {n} samples loop within "
            f"{r['config']['sample_max_new_tokens']} tokens: the CLI cuts them to one copy.", ""]


def sample_lines(r: dict) -> list[str]:
    """Each sample as the model wrote it, and as the CLI writes it where its repetition stop ended a loop."""
    lines = ["## Ten sample completions", "",
             f"Greedy with token healing, at most {r['config']['sample_max_new_tokens']} new tokens: the prompt, "
             "then the model's continuation after `⟨…⟩` "
             "(*degenerate*: the last 8 tokens repeat a cycle of at most 4). Where the CLI's repetition stop "
             "(`earlyexit.runtime.repetition`, on by default) ends a loop, what the CLI writes follows.", ""]
    for s in r["samples"]:
        lines += (["*degenerate*"] if s["degenerate"] else []) + ["```python", s["prompt"] + "⟨…⟩" + s["completion"], "```", ""]
        if s["cli_finish"] == "repetition":
            lines += ["The CLI stops at the loop and writes:", "```python", s["prompt"] + "⟨…⟩" + s["cli_completion"], "```", ""]
    return lines


LIMITS = (
    "## Limits",
    "- A small model trained for a few hours on two CPU cores: it knows Python's surface and the idioms of the "
    "standard library, torch, transformers and numpy; it does not reason about a program.",
    "- The test split is held out by file; code shared across files (licence headers, common idioms) still appears in training.",
    "",
)


def render_card(r: dict, has_plot: bool) -> str:
    """The card's Markdown from `r`, an evaluation's result; `has_plot`: training_curve.png was drawn beside it."""
    lc = r["line_completion"]
    # the runtime's healing is set beside the quality curve only where the curve's own measure (one-token healing) was taken
    runtime = lc if r.get("line_completion_one_token_healing") else None
    lines = [*intro_lines(r), *data_lines(r), *recipe_lines(r), *held_out_lines(r), *line_error_lines(lc), *figure_lines(r, has_plot)]
    lines += curve_lines(r.get("quality_curve"), r["training"]["step"], runtime)
    lines += [*target_lines(r), *sample_lines(r), *LIMITS]
    return "\n".join(lines)
