"""The model card's figure: the validation curve of training, cut where the corpus (and its validation split) changed.

`curve_segments` is shared with the card's text, which names each break; `plot_curve` draws `training_curve.png`.
"""

from __future__ import annotations

from pathlib import Path


def curve_segments(curve: list[dict]) -> list[tuple[str, list[dict]]]:
    """The curve cut where its work_dir (and so its validation split) changes: (work_dir, points) in order."""
    segments: list[tuple[str, list[dict]]] = []
    for row in curve:
        where = row.get("work_dir", "")
        if not segments or segments[-1][0] != where:
            segments.append((where, []))
        segments[-1][1].append(row)
    return segments


def plot_curve(curve: list[dict], path: Path) -> bool:
    if not curve:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    segments = curve_segments(curve)
    for i, (where, rows) in enumerate(segments):
        tokens = [r["tokens_seen"] / 1e6 for r in rows]
        if i:  # a new corpus: its validation split is another one
            ax.axvline(tokens[0], color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"corpus: {where}", (tokens[0], 0.5), xycoords=("data", "axes fraction"), xytext=(-4, 0),
                        textcoords="offset points", ha="right", fontsize="small", color="grey")
        ax.plot(tokens, [r["val_loss"] for r in rows], color="tab:blue", marker="o", markersize=4,
                label="validation loss" if i == 0 else None)
        ax2.plot(tokens, [r["val_top1"] for r in rows], color="tab:orange", marker="s", markersize=4,
                 label="validation top-1" if i == 0 else None)
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax2.set_ylabel("next-token top-1")
    fig.legend(loc="lower center", ncol=2, fontsize="small")
    ax.set_title("Default model: validation curve" + (" (breaks where the corpus changed)" if len(segments) > 1 else ""))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
