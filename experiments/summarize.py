"""Write the results section of experiments/README.md from the committed results files, beside the study's figures.

    python experiments/summarize.py

Reads experiments/results/<name>/results.json for every experiment that has run and
rewrites what lies between the `results:start` and `results:end` markers of
experiments/README.md. Nothing in that section is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start (written by experiments/summarize.py) -->", "<!-- results:end -->"
STUDY = {"right_at_layer_1": 0.544, "wrong_at_all_layers": 0.145, "acceptance_after_wrong_token": 0.042,
         "layers_skipped": 1.7, "n_layer": 16, "speedup": 0.112, "rouge_l_change": -0.011}


def load(results: Path, name: str) -> dict | None:
    path = results / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def minutes(r: dict) -> str:
    secs = r["stamp"].get("wall_seconds")
    return "-" if secs is None else f"{secs / 60:.1f} min"


def origin(r: dict) -> str:
    return f"commit `{r['stamp']['commit']}`, {minutes(r)}"


def study_rows(results: Path) -> list[str]:
    """The study's published figures beside ours, one row each, from whichever experiments have run."""
    rows = ["| figure | study (GPT-2, 16 layers) | ours | from |", "|---|---|---|---|"]
    layer = load(results, "per_layer_study")
    if layer:
        rows += [
            f"| tokens right at layer 1 | {STUDY['right_at_layer_1']:.1%} | {layer['right_at_layer_1']:.1%} | per_layer_study |",
            f"| tokens wrong at every layer | {STUDY['wrong_at_all_layers']:.1%} | {layer['wrong_at_all_layers']:.1%} | per_layer_study |",
        ]
        wrong = layer["acceptance_proxy"].get("first token wrong", {})
        if wrong.get("exact_match") is not None:
            rows.append(f"| completions accepted after a wrong token (ours: exact match, automatic proxy) | "
                        f"{STUDY['acceptance_after_wrong_token']:.1%} | {wrong['exact_match']:.1%} | per_layer_study |")
    sweep = load(results, "threshold_sweep")
    if sweep:
        chosen = next(r for r in sweep["rows"] if r["point"].startswith("chosen"))
        L = sweep["n_layer"]
        rows += [
            f"| layers skipped at the chosen thresholds | {STUDY['layers_skipped']}/{STUDY['n_layer']} | "
            f"{chosen['layers_skipped']:.2f}/{L} | threshold_sweep ({chosen['point']}) |",
            f"| speed vs full at the chosen thresholds | {STUDY['speedup']:+.1%} | {chosen['speedup'] - 1:+.1%} | threshold_sweep |",
            f"| ROUGE-L change at the chosen thresholds | {STUDY['rouge_l_change']:+.1%} | {chosen['rouge_l_change']:+.1%} | threshold_sweep |",
        ]
        best = max(sweep["rows"], key=lambda r: r["speedup"])
        rows.append(f"| fastest point of the sweep | - | {best['point']}: {best['speedup']:.2f}× at {best['rouge_l_change']:+.1%} ROUGE-L, "
                    f"{best['layers_skipped']:.2f}/{L} layers skipped | threshold_sweep |")
    return rows


def section(results: Path) -> str:
    out = ["### Results of the default model", "", *study_rows(results), ""]
    runs = [("per_layer_study", "Per-layer study (RQ1)"), ("threshold_sweep", "Threshold sweep (RQ2)"),
            ("stop_analysis", "Stop analysis"), ("member_completion", "Member completion"),
            ("benchmark_generate", "Speed against other engines"), ("benchmark_generate_line", "Speed on line completions"),
            ("draft_layers", "Lossless drafts from the first E layers (LayerSkip) beside the int8 drafts"),
            ("decode_profile", "Decode-step profile, torch.compile"),
            ("head_loss_ablation", "Head-loss ablation"), ("ngram_cache_sweep", "N-gram cache weight"),
            ("exit_training", "A backbone trained to exit, beside the shipped one"),
            ("exit_signals", "Which signal should decide an exit"),
            ("serve_load", "The completion server under 1, 4 and 16 clients"),
            ("fuzz", "Fuzzing the front door")]
    out += ["| experiment | results | how it ran |", "|---|---|---|"]
    for name, title in runs:
        r = load(results, name)
        out.append(f"| {title} | [{name}/results.md](results/{name}/results.md) | "
                   + (origin(r) + f", {r['stamp']['machine']}" if r else "not run yet") + " |")
    stop = load(results, "stop_analysis")
    if stop:
        chosen = next((r for r in stop["rows"] if r["threshold"] == stop["chosen_stop_threshold"]), None)
        if chosen:
            out += ["", f"Stopping at the chosen threshold {stop['chosen_stop_threshold']:g}: {chosen['stopped']:.1%} of completions stopped, "
                    f"{chosen['precision']:.1%} of stops were right (the unwritten rest was wrong), recall {chosen['recall']:.1%}, "
                    f"{chosen['tokens_saved']:.1%} of tokens saved; completions that are non-empty and all right: "
                    f"{chosen['acceptable_without_stop']:.1%} without stopping, {chosen['acceptable_with_stop']:.1%} with it."
                    if chosen["precision"] is not None else f"Stopping at the chosen threshold never fired on {stop['prompts']} prompts."]
    member = load(results, "member_completion")
    if member:
        f = member["full"]
        chosen = next((r for r in member["early_exit"] if r["chosen"]), None)
        out += ["", f"Member completion ({member['sites_scored']:,} `name.` sites): full top-1 {f['top1']:.1%}, top-5 {f['top5']:.1%}, "
                f"MRR {f['mrr']:.3f}" + (f"; early-exit at the chosen threshold {chosen['top1']:.1%} / {chosen['top5']:.1%} / "
                                       f"{chosen['mrr']:.3f} with {chosen['mean_layers']:.2f} layers." if chosen else ".")]
    cache = load(results, "ngram_cache_sweep")
    if cache:
        whole = {r["weight"]: r for r in cache["rows"] if r["prompt"] == "whole file" and r["sweep"] == "weight"}
        off, best = whole[0.0], whole[cache["best_weight"]]
        out += ["", f"N-gram cache ({cache['lines']} validation lines, the whole file above each cut as the prompt): weight "
                f"{cache['best_weight']:g}, the CLI's default, takes exact match from {off['exact_match']:.1%} to {best['exact_match']:.1%} "
                f"and edit similarity from {off['edit_similarity']:.3f} to {best['edit_similarity']:.3f} "
                f"({best['against_no_cache']['gained']} lines gained, {best['against_no_cache']['lost']} lost)."]
    trained = load(results, "exit_training")
    if trained:
        b, a = trained["before"], trained["after"]
        depth = lambda r: "-" if r["controller_mean_layers"] is None else f"{r['controller_mean_layers']:.2f}"  # noqa: E731
        out += ["", f"Trained to exit (`{a['model']}` against `{b['model']}`, teacher-forced on the same test tokens): right at "
                f"layer 1 {b['right_at_layer_1']:.1%} -> {a['right_at_layer_1']:.1%}, oracle mean depth {b['oracle_mean_depth']:.2f} -> "
                f"{a['oracle_mean_depth']:.2f} of {a['n_layer']}, the controller at its calibrated threshold {depth(b)} -> {depth(a)} "
                f"layers, last-layer loss {b['test_loss']:.3f} -> {a['test_loss']:.3f}."]
    for name, what in (("benchmark_generate", "Speed, the study's task"), ("benchmark_generate_line", "Speed, line completions")):
        bench = load(results, name)
        if not bench:
            continue
        out += ["", f"{what} (batch 1; median ms per generated token and its ratio to our `full`, and to llama.cpp fp32 on the "
                "same weights where it ran; identical output to `full`" + ("; line exact match" if name.endswith("line") else "") + "): "
                + "; ".join(speed_row(r) for r in bench["rows"]) + "."]
    return "\n".join(out)


def speed_row(r: dict) -> str:
    ratio = lambda key: "-" if r.get(key) is None else f"{r[key]:.2f}×"  # noqa: E731
    em = "" if r.get("line_exact_match") is None else f", EM {r['line_exact_match']:.1%}"
    return (f"{r['engine']} {r['median_ms_per_token']:.2f} ms ({ratio('speedup_vs_full')} full, {ratio('speedup_vs_llama_cpp')} llama.cpp), "
            f"{r['identical_to_full']:.0%} identical{em}")


def rewrite(readme: Path, body: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no results markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + body + "\n" + END + tail)
    print(f"wrote the results section of {readme}")


def main(argv=None) -> int:
    body = section(HERE / "results")
    for readme in (HERE / "README.md", HERE.parent / "README.md"):
        rewrite(readme, body.replace("](results/", "](experiments/results/") if readme.parent != HERE else body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
