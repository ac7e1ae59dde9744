"""Evaluate a trained backbone on its own corpus splits and write its model card.

    python -m earlyexit.evaluation.model_card --model DIR [--config configs/model_card.yaml] [key=value ...]

Reads `DIR/training_state.json` (written by `train_lm`) to rebuild the exact corpus split
the model was trained on, then measures on the held-out splits: loss, perplexity and
next-token top-1 (validation and test), line completion at random points inside test
lines (target = rest of the line: exact match, edit similarity), the study's 10-token
completions (exact match, ROUGE-L, edit similarity), the rate of degenerate repetition,
and ten sample completions. Writes `DIR/eval.json`, `DIR/training_curve.png` and
`DIR/MODEL_CARD.md`: every figure in the card comes from this script.

The work is split by job: `card_evaluation` measures (`evaluate`), `card_evidence` reads and writes up the
experiments' results, `card_render` writes the Markdown, `card_plot` draws the curve; this module is the script
that runs them and writes the files. The names other code imported from here before the split still import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import config_parser, exit_code, load_config
from ..errors import EarlyExitError
from .card_evaluation import ModelCardConfig, corpus_splits, evaluate
from .card_evidence import EXPERIMENT_RESULTS, curve_lines, recipe_evidence, sweep_lines, throughput_lines
from .card_plot import curve_segments, plot_curve
from .card_render import (cache_note, cache_rows, cache_target_rows, code_cell, completion_row, line_error_lines, render_card,
                          source_list)

# the names this module held before the split, for the code and tests that import them from here
__all__ = ["EXPERIMENT_RESULTS", "ModelCardConfig", "cache_note", "cache_rows", "cache_target_rows", "code_cell", "completion_row",
           "corpus_splits", "curve_lines", "curve_segments", "evaluate", "line_error_lines", "main", "plot_curve", "recipe_evidence",
           "render_card", "rerender_card", "source_list", "sweep_lines", "throughput_lines", "write_card"]


def write_card(model_dir: Path, cfg: ModelCardConfig, log: Path | None) -> None:
    """Evaluate the model in `model_dir`, then write its eval.json, training_curve.png and MODEL_CARD.md."""
    result = evaluate(model_dir, cfg, log)
    (model_dir / "eval.json").write_text(json.dumps(result, indent=2))
    has_plot = plot_curve(result["training"].get("curve", []), model_dir / "training_curve.png")
    (model_dir / "MODEL_CARD.md").write_text(render_card(result, has_plot))
    v, lc = result["validation"], result["line_completion"]
    print(f"validation loss {v['loss']:.3f}, top-1 {v['top1']:.1%}; line exact match {lc['exact_match']:.1%}, "
          f"edit similarity {lc['edit_similarity']:.3f}; wrote {model_dir / 'MODEL_CARD.md'}")


def rerender_card(model_dir: Path, root: Path = EXPERIMENT_RESULTS) -> None:
    """MODEL_CARD.md again from the model's eval.json, with the experiments' current results (`recipe_evidence`: the
    quality curve, the sweeps, training throughput) in place of those it was evaluated beside. For when a phase trained
    but did not ship: the curve gains its point, the model's own figures stay those measured (each section names the
    commit its figures come from)."""
    path = model_dir / "eval.json"
    if not path.is_file():
        raise EarlyExitError(f"{model_dir} has no eval.json: write its card once without --render-only")
    result = json.loads(path.read_text()) | recipe_evidence(root)  # a result missing here keeps the card's copy
    path.write_text(json.dumps(result, indent=2))
    (model_dir / "MODEL_CARD.md").write_text(render_card(result, (model_dir / "training_curve.png").is_file()))
    print(f"rewrote {model_dir / 'MODEL_CARD.md'} from its eval.json and the results in {root}")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], ModelCardConfig)
    parser.add_argument("--model", required=True, help="model directory written by train_lm (with training_state.json)")
    parser.add_argument("--log", help="training log.jsonl, for the curve (default: the curve in training_state.json)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the card from the model's eval.json and the experiments' current results, without evaluating")
    args = parser.parse_args(argv)
    if args.render_only:
        return exit_code(lambda: rerender_card(Path(args.model)))
    return exit_code(lambda: write_card(Path(args.model), load_config(ModelCardConfig, args.config, args.overrides),
                                        Path(args.log) if args.log else None))


if __name__ == "__main__":
    sys.exit(main())
