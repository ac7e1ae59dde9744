"""The study's RQ1 with our exit heads: at which layer is each token already right, and which are never right?

    python experiments/per_layer_study.py [--model DIR] [--config configs/per_layer_study.yaml] [--limit N] [key=value ...]

Teacher-forced over windows of the test split, for every token: the first layer whose
exit head predicts the reference token, and the first layer whose head agrees with the
last layer. Reported: the share right at layer 1 (the study: 54.4% on GPT-2), the share
wrong at every layer (the study: 14.5%), and the cumulative curves per layer (plot).

The study's acceptance finding (completions that go on from a wrong token were accepted
4.2% of the time) has no annotators here; its automatic proxy: 10-token greedy
completions of test-split prompts, grouped by whether their first token is wrong, with
each group's exact match and edit similarity against the reference.
Writes experiments/results/per_layer_study/ (JSON, Markdown, PNG).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_main, load_model_and_heads, stamp, test_split_files, write_results  # noqa: E402

STUDY = {"right_at_layer_1": 0.544, "wrong_at_all_layers": 0.145, "acceptance_after_wrong_token": 0.042}


@dataclass
class StudyConfig:
    seq_len: int = 256
    windows: int = 200
    completions: int = 300
    target_tokens: int = 10
    seed: int = 0


def token_windows(files, tok, windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """Up to `windows` windows of seq_len + 1 tokens of `files`: (n, seq_len + 1), the same for every model sharing `tok`."""
    from earlyexit.data.corpus import window_batch
    from earlyexit.training.train_heads import tokenize_until

    tokens = tokenize_until(files, tok, windows * (seq_len + 1) * 2, seed)
    return window_batch(tokens, seq_len, 0, min(windows, (len(tokens) - 1) // seq_len), seed)


def first_layers(model, heads, windows: torch.Tensor, batch: int = 8):
    """Per token: first layer (1-based) right against the reference, first agreeing with the last layer (0 = never)."""
    from tqdm import tqdm

    from earlyexit.training.train_heads import layer_predictions, layer_states

    right_first, agree_first = [], []
    for chunk in tqdm(windows.split(batch), desc="teacher-forced layers"):
        x, target = chunk[:, :-1], chunk[:, 1:]
        preds = layer_predictions(heads, model, layer_states(model, x, bf16=False))  # (L, B, T)
        for hits, out in ((preds == target[None], right_first), (preds == preds[-1][None], agree_first)):
            any_hit = hits.any(dim=0)
            first = hits.float().argmax(dim=0) + 1
            out.append(torch.where(any_hit, first, torch.zeros_like(first)).flatten())
    return torch.cat(right_first).numpy(), torch.cat(agree_first).numpy()


def acceptance_proxy(model, tok, examples) -> dict:
    from tqdm import tqdm

    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.decoding import GenerationSettings
    from earlyexit.evaluation.metrics import edit_similarity, exact_match

    groups = {"first token wrong": [], "first token right": []}
    targets = [tok.encode(ex.target) for ex in examples]
    completions = []
    for i in tqdm(range(0, len(examples), 16), desc="completions"):  # batched by target length, equal to one at a time
        for n in sorted({len(t) for t in targets[i:i + 16]}):
            chunk = [j for j in range(i, min(i + 16, len(examples))) if len(targets[j]) == n]
            completions += list(zip(chunk, complete_batch(model, tok, [examples[j].prompt for j in chunk],
                                                          GenerationSettings(max_new_tokens=max(1, n), truncate_prompt=True))))
    for j, c in sorted(completions, key=lambda jc: jc[0]):
        ex, target_ids = examples[j], targets[j]
        wrong = not c.token_ids or not target_ids or c.token_ids[0] != target_ids[0]
        groups["first token wrong" if wrong else "first token right"].append((exact_match(c.text, ex.target), edit_similarity(c.text, ex.target)))
    return {name: {"completions": len(v), "exact_match": float(np.mean([e for e, _ in v])) if v else None,
                   "edit_similarity": float(np.mean([s for _, s in v])) if v else None} for name, v in groups.items()}


def plot(right: np.ndarray, agree: np.ndarray, L: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, L + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(layers, [((right > 0) & (right <= i)).mean() for i in layers], marker="o", label="right vs reference by layer")
    ax.plot(layers, [((agree > 0) & (agree <= i)).mean() for i in layers], marker="s", label="agrees with last layer by layer")
    ax.axhline(STUDY["right_at_layer_1"], color="gray", linestyle=":", label="study: right at layer 1 (GPT-2)")
    save_by_layer_plot(fig, ax, layers, "Where tokens are first right (teacher-forced, test split)", path)


def save_by_layer_plot(fig, ax, layers, title: str, path: Path) -> None:
    """Axes, legend and file of a plot of cumulative token shares by exit layer (this study's and exit_training's)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("layer (exit head)")
    ax.set_ylabel("share of test tokens (cumulative)")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return experiment_main(argv, __doc__, StudyConfig, run, "quick run: at most this many windows and completions")


def run(args, cfg: StudyConfig) -> None:
    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.loading import resolve_model_dir

    if args.limit:
        cfg.windows, cfg.completions = min(cfg.windows, args.limit), min(cfg.completions, args.limit)
    model_dir = resolve_model_dir(args.model)
    model, tok, heads = load_model_and_heads(model_dir)
    test_files = test_split_files(model_dir, args.data)
    right, agree = first_layers(model, heads, token_windows(test_files, tok, cfg.windows, cfg.seq_len, cfg.seed))
    L = model.dims.n_layer
    examples = token_cut_examples(test_files, tok, cfg.completions, cfg.target_tokens, seed=cfg.seed)
    proxy = acceptance_proxy(model, tok, examples)
    result = {
        "stamp": stamp(str(model_dir), {**vars(cfg), "data": args.data or "test split"}), "tokens": int(right.size), "n_layer": L,
        "right_at_layer_1": float((right == 1).mean()), "wrong_at_all_layers": float((right == 0).mean()),
        "agree_at_layer_1": float((agree == 1).mean()),
        "mean_first_agreeing_layer": float(agree.mean()),
        "right_first_at_layer": [float((right == i).mean()) for i in range(1, L + 1)],
        "agree_first_at_layer": [float((agree == i).mean()) for i in range(1, L + 1)],
        "acceptance_proxy": proxy, "study": STUDY,
    }
    out = write_results("per_layer_study", result, "")
    plot(right, agree, L, out / "cumulative_by_layer.png")
    lines = [
        f"Teacher-forced over {result['tokens']:,} test-split tokens; {L}-layer model, exit heads after every block.", "",
        "| | ours | study (GPT-2, Python) |", "|---|---|---|",
        f"| tokens right at layer 1 | {result['right_at_layer_1']:.1%} | {STUDY['right_at_layer_1']:.1%} |",
        f"| tokens wrong at every layer | {result['wrong_at_all_layers']:.1%} | {STUDY['wrong_at_all_layers']:.1%} |",
        f"| tokens whose layer-1 head already gives the last layer's token | {result['agree_at_layer_1']:.1%} | - |",
        "", "| layer | first right here | first agrees with last layer here |", "|---|---|---|",
        *[f"| {i + 1} | {a:.1%} | {b:.1%} |" for i, (a, b) in enumerate(zip(result["right_first_at_layer"], result["agree_first_at_layer"]))],
        "", f"Acceptance proxy ({cfg.target_tokens}-token greedy completions; the study: {STUDY['acceptance_after_wrong_token']:.1%} "
        "of completions after a wrong token were accepted by people):", "",
        "| group | completions | exact match | edit similarity |", "|---|---|---|---|",
        *[f"| {k} | {v['completions']} | {v['exact_match'] if v['exact_match'] is None else format(v['exact_match'], '.1%')} | "
          f"{v['edit_similarity'] if v['edit_similarity'] is None else format(v['edit_similarity'], '.3f')} |" for k, v in proxy.items()],
        "", "![cumulative share by layer](cumulative_by_layer.png)",
    ]
    write_results("per_layer_study", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
