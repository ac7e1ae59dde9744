"""How well a backbone predicts held-out code: next-token loss over a split, and scored greedy completions.

The model card and `experiments/quality_curve.py` measure with these, so their figures are the same measure;
`quality_projection` fits the quality curve against log(tokens seen), for both to say how far a target is.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..runtime.ngram_cache import SKIP_RECENT


@torch.inference_mode()
def lm_metrics(hf, tok, files, windows: int, seq_len: int) -> dict:
    """Next-token loss, perplexity and top-1 over evenly spaced windows of the split's token stream."""
    encoded = tok([f["text"] for f in files], add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for ids in encoded for t in (*ids, tok.eos_token_id)), dtype=np.int64)
    n = (len(stream) - 1) // seq_len
    picks = np.linspace(0, n - 1, num=min(windows, n)).astype(int)
    loss, correct, count = 0.0, 0, 0
    for chunk in np.array_split(picks, max(1, len(picks) // 8)):
        x = torch.from_numpy(np.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in chunk]))
        logits = hf(x[:, :-1]).logits
        loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == x[:, 1:]).sum().item()
        count += x[:, 1:].numel()
    return {"loss": loss / count, "perplexity": math.exp(loss / count), "top1": correct / count, "tokens": count, "split_tokens": int(len(stream))}


def completion_metrics(model, tok, examples, max_new_tokens: int, line_mode: bool, desc: str, healing: bool = False,
                       batch_size: int = 16, per_example: bool = False, healing_mode: str = "word", shown: int = 0,
                       cache_weight: float = 0.0, cache_skip_recent: int = SKIP_RECENT) -> dict:
    """Greedy completions of `examples` (batched: equal to one at a time, row for row) scored against their targets.
    `healing_mode`: how far token healing backs off; `cache_weight`, `cache_skip_recent`: the n-gram cache's (`GenerationSettings`).

    `per_example` adds `exact`: one character per example, "1" where it matched exactly, for paired comparisons
    of two models on the same examples (`paired_exact_match`). `shown` > 0 adds `breakdown` (`completion_breakdown`)
    and the first `shown` examples as scored (`shown_examples`: prompt's last line, target, prediction, scores)."""
    import warnings

    from tqdm import tqdm

    from ..runtime.batch import complete_batch
    from ..runtime.decoding import GenerationSettings
    from .metrics import edit_similarity, exact_match, indel_similarity, is_degenerate, rouge_l

    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop_strings=("\n",) if line_mode else (), truncate_prompt=True,
                                  token_healing=healing, healing_mode=healing_mode,
                                  cache_weight=cache_weight, cache_skip_recent=cache_skip_recent)
    em, es, indel, rl, degenerate = [], [], [], [], 0
    completions, predictions = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts are left-truncated on purpose
        for i in tqdm(range(0, len(examples), batch_size), desc=desc, dynamic_ncols=True):
            completions += complete_batch(model, tok, [ex.prompt for ex in examples[i:i + batch_size]], settings)
    for ex, c in zip(examples, completions):
        pred = c.text.split("\n")[0] if line_mode else c.text
        predictions.append(pred)
        em.append(exact_match(pred, ex.target))
        es.append(edit_similarity(pred, ex.target))
        indel.append(indel_similarity(pred, ex.target))
        rl.append(rouge_l(pred, ex.target))
        degenerate += is_degenerate(c.token_ids)
    return {
        "examples": len(examples), "exact_match": float(np.mean(em)), "edit_similarity": float(np.mean(es)),
        "indel_similarity": float(np.mean(indel)),
        "rouge_l": float(np.mean(rl)), "degenerate_rate": degenerate / len(examples),
        **({"exact": "".join("1" if m else "0" for m in em)} if per_example else {}),
        **({"breakdown": completion_breakdown(predictions, [ex.target for ex in examples]),
            "shown_examples": [{"prompt_line": ex.prompt.rsplit("\n", 1)[-1], "target": ex.target, "prediction": p,
                                "exact": bool(m), "edit_similarity": e} for ex, p, m, e in zip(examples[:shown], predictions, em, es)]}
           if shown else {}),
    }


def completion_breakdown(predictions: list[str], targets: list[str]) -> dict:
    """Where completions part from their targets (both without trailing whitespace, as `exact_match` compares):
    shares that are exact, that stop short (a strict prefix of the target), that run on (the target is a strict
    prefix of them) and that go wrong inside the target, plus the mean share of each target's characters written
    right before the first wrong one: what a reader accepting the completion up to its first mistake keeps."""
    kinds = {"exact": 0, "stopped_short": 0, "ran_on": 0, "diverged": 0}
    kept = []
    for p, t in zip(predictions, targets):
        p, t = p.rstrip(), t.rstrip()
        same = next((i for i, (a, b) in enumerate(zip(p, t)) if a != b), min(len(p), len(t)))
        kinds["exact" if p == t else "stopped_short" if same == len(p) else "ran_on" if same == len(t) else "diverged"] += 1
        kept.append(same / len(t) if t else 1.0)
    n = max(1, len(targets))
    return {**{k: v / n for k, v in kinds.items()}, "target_share_right_before_first_error": float(np.mean(kept)) if kept else 0.0}


def paired_exact_match(before: str, after: str) -> dict:
    """Two models' exact matches on the same examples (`exact` strings): lines gained (wrong before, right after),
    lost, and the two-sided sign test's p-value on the discordant lines: whether the change is more than noise."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison of {len(before)} and {len(after)} examples")
    gained = sum(a == "0" and b == "1" for a, b in zip(before, after))
    lost = sum(a == "1" and b == "0" for a, b in zip(before, after))
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n if n else 1.0
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


# issue #6's acceptance targets for the default model: the model card's table and the quality curve's fit read these
TARGET_LINE_COMPLETION = {"exact_match": 0.25, "edit_similarity": 0.60}  # healed, on the test split
TARGET_VALIDATION_LOSS = 2.0  # nats/token, at most


def quality_projection(rows: list[dict], targets: dict[str, float]) -> dict[str, dict]:
    """Least-squares fit of each measure against log(tokens seen) over every point, and where it meets its target.

    An extrapolation from the curve so far, not a promise: quality against log-compute is roughly straight over a
    range and flattens later, so the tokens given are a lower bound on what the target takes with this recipe.
    """
    out = {}
    if len(rows) < 3:  # two points always fit a line exactly
        return out
    x = np.log([r["tokens_seen"] for r in rows])
    for measure, target in targets.items():
        slope, intercept = np.polyfit(x, [r[measure] for r in rows], 1)
        if slope * x[-1] + intercept >= target:
            reach = float(rows[-1]["tokens_seen"])  # the fit is there already
        else:
            reach = float(np.exp((target - intercept) / slope)) if slope > 0 else None
        out[measure] = {"target": target, "slope": float(slope), "intercept": float(intercept),  # per log(tokens)
                        "per_doubling": float(slope * np.log(2)), "points": len(rows),
                        "tokens_at_target": reach, "times_last": reach / rows[-1]["tokens_seen"] if reach else None}
    return out


def projection_lines(fits: dict[str, dict]) -> list[str]:
    """One line per measure: its gain per doubling of tokens seen and where the fit meets the target."""
    names = {"exact_match": "exact match", "edit_similarity": "edit similarity"}
    out = []
    for measure, f in fits.items():
        pct = measure == "exact_match"
        target = f"{f['target']:.0%}" if pct else f"{f['target']:.2f}"
        gain = f"{f['per_doubling'] * 100:+.1f} points" if pct else f"{f['per_doubling']:+.3f}"
        if f["tokens_at_target"] is None:
            where = "it does not rise, so the fit never reaches " + target
        elif f["times_last"] <= 1:
            where = f"the fit is at or past {target} already"
        else:
            where = f"the fit reaches {target} at about {f['tokens_at_target'] / 1e6:,.0f}M tokens seen ({f['times_last']:.1f}x the last point's)"
        out.append(f"- {names.get(measure, measure)}: {gain} per doubling of tokens seen; {where}.")
    if out:
        n = next(iter(fits.values()))["points"]
        out.insert(0, f"Fitted against log(tokens seen) over all {n} points. An extrapolation: curves like this flatten, "
                      "so read the tokens as a lower bound for this recipe.")
    return out


def paired_lines(paired: list[dict]) -> list[str]:
    """One line per paired comparison of consecutive curve points."""
    return [f"- Exact match from step {c['from_step']:,} to {c['to_step']:,}, line by line: {c['gained']} lines gained, "
            f"{c['lost']} lost (sign test p = {c['p_value']:.2g}: "
            f"{'a change beyond noise at 5%' if c['p_value'] < 0.05 else 'not distinguishable from noise at 5%'})." for c in paired]
