"""The model card's evidence from the experiments: reading their saved results and writing their sections.

`recipe_evidence` gathers what the experiment scripts measured about the recipe (training throughput, the proxy
sweeps, line completion against tokens seen) from `experiments/results/*/results.json`, each with the commit it ran
at; `throughput_lines`, `sweep_lines` and `curve_lines` turn them into the card's Markdown lines. Kept apart from
the model's own figures because a card is re-rendered with newer evidence and the same model (`--render-only`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .backbone_quality import paired_lines, projection_lines

EXPERIMENT_RESULTS = Path(__file__).resolve().parents[2] / "experiments/results"  # in a source checkout


def recipe_evidence(root: Path = EXPERIMENT_RESULTS) -> dict:
    """What the experiments measured about the recipe, where a source checkout has their results: training
    throughput per choice, the proxy sweeps (learning rate, shape, vocabulary) and line completion against
    tokens seen. Each keeps the commit its script ran at."""
    out = {}
    for name in ("train_throughput", "recipe_sweep", "vocab_sweep", "schedule_sweep", "quality_curve"):
        path = root / name / "results.json"
        if path.is_file():
            r = json.loads(path.read_text())
            out[name] = {k: v for k, v in r.items() if k != "stamp"} | {k: r["stamp"].get(k) for k in ("commit", "config", "machine")}
    return out


def throughput_lines(measured: dict | list | None) -> list[str]:
    meta = measured if isinstance(measured, dict) else {"rows": measured}  # cards before recipe_evidence kept the rows alone
    rows = meta.get("rows")
    if not rows:
        return []
    where = (f" on {meta['machine']}" if meta.get("machine") else "") + (f" at commit `{meta['commit']}`" if meta.get("commit") else "")
    out = ["", f"Training throughput of the choices, measured side by side in one run (`experiments/train_throughput.py`{where}):", "",
           "| choice | tokens/s |", "|---|---|"]
    for row in rows:
        name = row.get("variant")
        rate = row.get("tokens_per_s") or row.get("tok_s")
        if name is not None and rate is not None:
            out.append(f"| {name} | {rate:,.0f} |")
    return out


def sweep_lines(recipe: dict | None, vocab: dict | None, schedule: dict | None = None) -> list[str]:
    """The proxy sweeps' outcomes, one line per swept choice."""
    out = []
    if recipe:
        c = recipe["config"]
        out += ["", f"Choices measured by short proxy runs from scratch ({c['steps']} steps of {c['batch_size']} × {c['seq_len']} tokens, "
                f"validation loss in nats/token; `experiments/recipe_sweep.py` at commit `{recipe['commit']}`"
                + (f", `experiments/vocab_sweep.py` at `{vocab['commit']}`" if vocab else "")
                + (f", `experiments/schedule_sweep.py` at `{schedule['commit']}`" if schedule else "") + "):", ""]
        lr_rows = [x for x in recipe["rows"] if x["sweep"] == "learning rate"]
        out.append(f"- Peak learning rate at {c['base_shape']}: " + ", ".join(f"{x['lr']:g} → {x['val_loss']:.2f}" for x in lr_rows)
                   + f"; best {recipe['best_lr']:g}.")
        shapes = [x for x in recipe["rows"] if x["lr"] == recipe["best_lr"]]
        out.append(f"- Depth × width at {recipe['best_lr']:g}, about equal block parameters: "
                   + ", ".join(f"{x['shape']} → {x['val_loss']:.2f}" for x in shapes) + f"; best {recipe['best_shape']}.")
    if vocab:
        c = vocab["config"]
        out.append(f"- Vocabulary at {c['shape']}, lr {c['lr']:g} (its own BPE per size, in nats per byte of text, comparable across sizes): "
                   + ", ".join(f"{x['vocab_size']:,} → {x['val_nats_per_byte']:.3f}" for x in vocab["rows"])
                   + f"; best {vocab['best_vocab_size']:,}.")
    if schedule:
        c, rows = schedule["config"], schedule["rows"]
        warm = [x for x in rows if x["sweep"] == "warm-up"]
        batch = [x for x in rows if x["sweep"] == "effective batch"]
        out.append(f"- Warm-up at {c['shape']}, lr {c['lr']:g}: " + ", ".join(f"{x['warmup_steps']} steps → {x['val_loss']:.2f}" for x in warm)
                   + f"; best {schedule['best_warmup']}.")
        out.append("- Effective batch by gradient accumulation at the same tokens seen: "
                   + ", ".join(f"{x['effective_batch']} windows → {x['val_loss']:.2f}" for x in batch)
                   + f"; best {schedule['best_effective_batch']} (a short run favours many small steps).")
    return out


def curve_lines(curve: dict | None, step: int, runtime: dict | None = None) -> list[str]:
    """Line completion against tokens seen, one point per phase checkpoint; `runtime`: this model's line completion with
    the runtime's healing, set beside the curve's last point (the curve heals one token, so its fit undershoots)."""
    if not curve or not curve.get("rows"):
        return []
    rows = curve["rows"]
    out = [f"Line completion (healing the last token only, so every phase is scored alike) against training tokens seen, "
           "one point per phase's last checkpoint "
           f"(`experiments/quality_curve.py` at commit `{curve['commit']}`, {rows[-1]['examples']} lines; a phase "
           "whose checkpoint was not on that machine keeps the row scored at an earlier commit, same lines):", "",
           "| step | tokens seen | layers | context | exact match | edit similarity | scored at |", "|---|---|---|---|---|---|---|"]
    out += [f"| {x['step']:,} | {x['tokens_seen'] / 1e6:.1f}M | {x.get('layers', '?')} | {x['context']} | {x['exact_match']:.1%} | "
            f"{x['edit_similarity']:.3f} | `{x.get('scored_at') or curve['commit']}` |" for x in rows]
    this = next((x for x in rows if x["step"] == step), None)
    if this is None:
        out += ["", f"The curve has no point at this model's step ({step:,}): rerun the script."]
    elif any(x["step"] > step for x in rows):
        out += ["", f"Points past step {step:,} are phases that trained but did not ship (this model is step {step:,})."]
    if curve.get("projection"):
        out += [""] + projection_lines(curve["projection"])
    if runtime and this is not None:
        out.append(f"- The fit is of the curve's measure. With the runtime's healing (the whole partial word) this model scores "
                   f"{runtime['exact_match']:.1%} / {runtime['edit_similarity']:.3f}, {(runtime['exact_match'] - this['exact_match']) * 100:+.1f} "
                   f"points / {runtime['edit_similarity'] - this['edit_similarity']:+.3f} from its point on the curve: read the "
                   "fit's distance to the targets as an upper bound for the runtime's.")
    # this model against the phase it continued from, line by line (else the newest pair)
    paired = curve.get("paired", [])
    out += paired_lines([x for x in paired if x["to_step"] == step][-1:] or paired[-1:])
    return out + [""]
