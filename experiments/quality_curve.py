"""Line-completion quality of the default model against training tokens seen, one point per saved checkpoint.

    python experiments/quality_curve.py --config configs/quality_curve.yaml [key=value ...]

Each point is a train_lm checkpoint with the recipe config it was trained under: the
weights are cut to the positions that config trained (as `train_lm` exports them), and the
model card's line-completion task runs on the test split (random point inside a line,
target = rest of the line, greedy with token healing, prompts left-truncated to the
context). The validation-loss curve is in the model card; this is the curve of what a
user sees. Writes experiments/results/quality_curve/ (JSON, Markdown, plot).
The checkpoints live in the training work_dir, so the script reruns on the machine that
trained the model (or any machine given the same files).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import training_experiment_main  # noqa: E402

from earlyexit.backbone_quality import projection_lines, quality_projection  # noqa: E402
from earlyexit.config import load_config, to_dict  # noqa: E402
from earlyexit.errors import EarlyExitError  # noqa: E402


@dataclass
class QualityCurveConfig:
    # [recipe config, checkpoint] pairs, oldest first
    points: list[list[str]] = field(default_factory=list)
    # the targets, where the fit below says at how many tokens seen the curve would reach them
    targets: dict[str, float] = field(default_factory=lambda: {"exact_match": 0.25, "edit_similarity": 0.60})
    line_examples: int = 300
    max_line_tokens: int = 32
    seed: int = 0
    plot: bool = True

    def __post_init__(self):
        if not self.points or any(len(p) != 2 for p in self.points):
            raise EarlyExitError("points must be a non-empty list of [recipe config, checkpoint] pairs")


def evaluate_point(recipe: str, checkpoint: str, test_files: list, cfg: QualityCurveConfig) -> dict:
    import torch
    from transformers import AutoTokenizer

    from earlyexit.data import line_cut_examples
    from earlyexit.model import GPT2
    from earlyexit.backbone_quality import completion_metrics
    from earlyexit.train_lm import LMTrainConfig, trained_context_model

    lm = load_config(LMTrainConfig, recipe)
    if not Path(checkpoint).is_file():
        raise EarlyExitError(f"checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise EarlyExitError(f"cannot read checkpoint {checkpoint}: {type(e).__name__}") from None
    tok = AutoTokenizer.from_pretrained(str(Path(lm.work_dir) / "tokenizer"))
    model = GPT2.from_hf(trained_context_model(state["model"], tok, lm).eval())
    examples = line_cut_examples(test_files, cfg.line_examples, seed=cfg.seed)
    metrics = completion_metrics(model, tok, examples, cfg.max_line_tokens, True, f"step {state['step']}", healing=True)
    return {"recipe": recipe, "checkpoint": checkpoint, "step": state["step"], "tokens_seen": state["tokens_seen"],
            "context": lm.seq_len, **metrics}


def render_rows(rows: list[dict]) -> str:
    lines = ["Line completion on the test split (random point inside a line, target = rest of the line, greedy, token healing).", "",
             "| checkpoint | recipe | step | tokens seen | context | exact match | edit similarity | ROUGE-L | degenerate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{Path(r['checkpoint']).name}` | `{r['recipe']}` | {r['step']:,} | {r['tokens_seen'] / 1e6:.1f}M | {r['context']} | "
                     f"{r['exact_match']:.1%} | {r['edit_similarity']:.3f} | {r['rouge_l']:.3f} | {r['degenerate_rate']:.1%} |")
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
    from earlyexit.model_card import corpus_splits
    from earlyexit.train_lm import LMTrainConfig

    last = to_dict(load_config(LMTrainConfig, cfg.points[-1][0]))
    splits, _ = corpus_splits({"config": last})  # every phase reads the same corpus and split
    rows = []
    for recipe, checkpoint in cfg.points:
        rows.append(evaluate_point(recipe, checkpoint, splits["test"], cfg))
        print(render_rows(rows[-1:]).splitlines()[-1], flush=True)
    return {"rows": rows, "projection": quality_projection(rows, cfg.targets)}


def render(cfg: QualityCurveConfig, result: dict) -> str:
    fits = projection_lines(result.get("projection", {}))
    return render_rows(result["rows"]) + ("\n\n" + "\n".join(fits) if fits else "")


def main(argv=None) -> int:
    return training_experiment_main(argv, __doc__, QualityCurveConfig, "quality_curve", "train_lm checkpoints", compute,
                                    render, plot)


if __name__ == "__main__":
    sys.exit(main())
