"""Line-completion quality of the default model against training tokens seen, one point per saved checkpoint.

    python experiments/quality_curve.py --config configs/quality_curve.yaml [key=value ...]

Each point is a train_lm checkpoint with the recipe config it was trained under (the
weights cut to the positions that config trained, as `train_lm` exports them), or an export
directory (what `train_lm` writes to out_dir, what ships). The model card's line-completion
task runs on the test split (random point inside a line, target = rest of the line, greedy
with token healing, prompts left-truncated to the context). `healing_mode: token`, the
healing the curve began with (the last token only), keeps the points comparable with rows
scored before healing backed off whole partial words (the model card reports both for the
shipped model). The validation-loss curve is in
the model card; this is the curve of what a user sees. Writes
experiments/results/quality_curve/ (JSON, Markdown, plot).

Checkpoints live in the training work_dir, on the machine that trained them. A point whose
file is not on this machine keeps its row from the results already written, when that row
was scored with the same settings on the same test split (each row records the split's
hash and the commit it was scored at); with no such row, it is an error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training_experiment_main  # noqa: E402

from earlyexit.evaluation.backbone_quality import TARGET_LINE_COMPLETION, paired_lines, projection_lines, quality_projection  # noqa: E402
from earlyexit.config import load_config, to_dict  # noqa: E402
from earlyexit.errors import EarlyExitError  # noqa: E402


@dataclass
class QualityCurveConfig:
    # [recipe config, checkpoint] pairs, oldest first
    points: list[list[str]] = field(default_factory=list)
    # the targets, where the fit below says at how many tokens seen the curve would reach them
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGET_LINE_COMPLETION))
    line_examples: int = 300
    max_line_tokens: int = 32
    seed: int = 0
    healing_mode: str = "token"  # token healing's reach (GenerationSettings): "token" as the curve began, "word" as the runtime
    plot: bool = True

    def __post_init__(self):
        if not self.points or any(len(p) != 2 for p in self.points):
            raise EarlyExitError("points must be a non-empty list of [recipe config, checkpoint] pairs")


def load_point(recipe: str, checkpoint: str):
    """(runtime model, tokenizer, step, tokens seen, context) of a train_lm checkpoint or export directory."""
    import json

    import torch
    from transformers import AutoTokenizer

    from earlyexit.runtime.loading import load_runtime_model
    from earlyexit.runtime.model import GPT2
    from earlyexit.training.lm_checkpoints import trained_context_model
    from earlyexit.training.train_lm import LMTrainConfig

    path = Path(checkpoint)
    if path.is_dir():
        state_path = path / "training_state.json"
        if not state_path.is_file():
            raise EarlyExitError(f"{path} has no training_state.json: not a train_lm export")
        state = json.loads(state_path.read_text())
        model, tok = load_runtime_model(path)
        return model, tok, state["step"], state["tokens_seen"], model.dims.n_positions
    lm = load_config(LMTrainConfig, recipe)
    if not path.is_file():
        raise EarlyExitError(f"checkpoint not found: {checkpoint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise EarlyExitError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}") from None
    tok = AutoTokenizer.from_pretrained(str(Path(lm.work_dir) / "tokenizer"))
    model = GPT2.from_hf(trained_context_model(state["model"], tok, lm).eval())
    return model, tok, state["step"], state["tokens_seen"], lm.seq_len


def evaluate_point(recipe: str, checkpoint: str, test_files: list, cfg: QualityCurveConfig) -> dict:
    from earlyexit.evaluation.backbone_quality import completion_metrics
    from earlyexit.data.corpus import line_cut_examples

    model, tok, step, tokens_seen, context = load_point(recipe, checkpoint)
    examples = line_cut_examples(test_files, cfg.line_examples, seed=cfg.seed)
    metrics = completion_metrics(model, tok, examples, cfg.max_line_tokens, True, f"step {step}", healing=True, per_example=True,
                                 healing_mode=cfg.healing_mode)
    return {"recipe": recipe, "checkpoint": checkpoint, "step": step, "tokens_seen": tokens_seen, "context": context,
            "layers": model.dims.n_layer, **metrics}


def recipe_of(recipe: str):
    from earlyexit.training.train_lm import LMTrainConfig

    return load_config(LMTrainConfig, recipe)


SCORING = {"line_examples": None, "max_line_tokens": None, "seed": None,  # the settings a kept row must share with this run,
           "healing_mode": "token"}  # with the value results written before the setting existed were scored at


def earlier_rows(cfg: QualityCurveConfig, test_hash: str) -> dict[tuple[str, str], dict]:
    """Rows of the results already written that this run may keep: same scoring settings, same test split (rows
    written before the split's hash was recorded count as scored on it), keyed by (recipe, checkpoint)."""
    import json

    from common import results_dir

    path = results_dir("quality_curve") / "results.json"
    if not path.is_file():
        return {}
    try:
        before = json.loads(path.read_text())
        settings = before["stamp"]["config"]
        rows = before["rows"]
    except (ValueError, KeyError, TypeError):
        raise EarlyExitError(f"{path} is not a quality_curve result: move it away to score every point afresh") from None
    if any(settings.get(k, default) != getattr(cfg, k) for k, default in SCORING.items()):
        return {}
    commit = before["stamp"].get("commit", "unknown")
    return {(r["recipe"], r["checkpoint"]): {**r, "scored_at": r.get("scored_at") or commit} for r in rows
            if r.get("test_split_sha256", test_hash) == test_hash}


def score_or_keep(recipe: str, checkpoint: str, test_files: list, test_hash: str, kept: dict, cfg: QualityCurveConfig) -> dict:
    if Path(checkpoint).exists():
        return {**evaluate_point(recipe, checkpoint, test_files, cfg), "test_split_sha256": test_hash, "scored_at": None}
    if (recipe, checkpoint) in kept:
        return {"layers": recipe_of(recipe).n_layer, **kept[(recipe, checkpoint)]}  # rows scored before layers were recorded
    raise EarlyExitError(f"checkpoint not found: {checkpoint} (and no earlier row of it, scored with these settings on "
                         "this test split, to keep)")


def render_rows(rows: list[dict], healing_mode: str) -> str:
    healing = "token healing of " + ("the last token only" if healing_mode == "token" else "the whole partial word")
    lines = [f"Line completion on the test split (random point inside a line, target = rest of the line, greedy, {healing}).", "",
             "| checkpoint | recipe | step | tokens seen | layers | context | exact match | edit similarity | ROUGE-L | degenerate | scored |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scored = f"earlier, at `{r['scored_at']}`" if r.get("scored_at") else "this run"
        lines.append(f"| `{Path(r['checkpoint']).name}` | `{r['recipe']}` | {r['step']:,} | {r['tokens_seen'] / 1e6:.1f}M | "
                     f"{r.get('layers', '?')} | {r['context']} | "
                     f"{r['exact_match']:.1%} | {r['edit_similarity']:.3f} | {r['rouge_l']:.3f} | {r['degenerate_rate']:.1%} | {scored} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """Each measure against tokens seen on a log axis, where the fit is a straight line: dashed out to where it
    meets the issue's target (dotted), so the distance left is visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, fits = result["rows"], result.get("projection", {})
    tokens = np.array([r["tokens_seen"] for r in rows]) / 1e6
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for measure, label, marker in (("exact_match", "exact match", "o"), ("edit_similarity", "edit similarity", "s")):
        (line,) = ax.plot(tokens, [r[measure] for r in rows], marker + "-", label=label)
        f = fits.get(measure)
        if f:
            ax.axhline(f["target"], color=line.get_color(), linestyle=":", linewidth=1, label=f"{label}: target")
            reach = min(f["tokens_at_target"] or 0, 20 * rows[-1]["tokens_seen"])  # where the fit meets it, within reason
            xs = np.geomspace(rows[0]["tokens_seen"], max(reach, rows[-1]["tokens_seen"]), 50)
            ax.plot(xs / 1e6, f["slope"] * np.log(xs) + f["intercept"], "--", color=line.get_color(), linewidth=1,
                    label=f"{label}: log-linear fit")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens seen (millions, log scale)")
    ax.set_ylabel("line completion (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "quality_curve.png", dpi=120)
    plt.close(fig)


def compute(cfg: QualityCurveConfig) -> dict:
    from earlyexit.data.corpus import file_list_hash
    from earlyexit.evaluation.model_card import corpus_splits
    from earlyexit.training.train_lm import LMTrainConfig

    last = to_dict(load_config(LMTrainConfig, cfg.points[-1][0]))
    splits, _ = corpus_splits({"config": last})  # every phase reads the same corpus and split
    test_hash = file_list_hash(splits["test"])
    kept = earlier_rows(cfg, test_hash)
    rows = []
    for recipe, checkpoint in cfg.points:
        rows.append(score_or_keep(recipe, checkpoint, splits["test"], test_hash, kept, cfg))
        print(render_rows(rows[-1:], cfg.healing_mode).splitlines()[-1], flush=True)
    return {"rows": rows, "test_split_sha256": test_hash, "paired": paired_steps(rows),
            "projection": quality_projection(rows, cfg.targets)}


def paired_steps(rows: list[dict]) -> list[dict]:
    """Each point against the one it continued from, line by line, where both kept their per-line exact matches: the
    point at its recipe's `rewarm_at` step where there is one (phases 11 and 12 both continue phase 10), else the
    point before it."""
    from earlyexit.evaluation.backbone_quality import paired_exact_match

    by_step = {r["step"]: r for r in rows}
    pairs = []
    for before, r in zip([None, *rows], rows):
        parent = by_step.get(recipe_of(r["recipe"]).rewarm_at) or before
        if parent is not None and parent is not r and parent.get("exact") and r.get("exact"):
            pairs.append({"from_step": parent["step"], "to_step": r["step"], **paired_exact_match(parent["exact"], r["exact"])})
    return pairs


def render(cfg: QualityCurveConfig, result: dict) -> str:
    fits = projection_lines(result.get("projection", {})) + paired_lines(result.get("paired", []))
    return render_rows(result["rows"], cfg.healing_mode) + ("\n\n" + "\n".join(fits) if fits else "")


def main(argv=None) -> int:
    return training_experiment_main(argv, __doc__, QualityCurveConfig, "quality_curve", "train_lm checkpoints", compute,
                                    render, plot)


if __name__ == "__main__":
    sys.exit(main())
