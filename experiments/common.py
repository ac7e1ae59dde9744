"""What every experiment script shares: the stamp on its results, prompts from the test split, output files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from earlyexit.model_card import git_commit, machine

RESULTS = Path(__file__).parent / "results"


def stamp(model: str, config: dict) -> dict:
    """Commit, machine, model and config: what a reader needs to trust or rerun a result."""
    return {"commit": git_commit(), "machine": machine(), "model": model, "config": config, "argv": sys.argv}


def test_split_files(model_dir: Path) -> list[dict[str, str]]:
    """The test split the model was trained beside (from its training_state.json), else the stdlib's."""
    from earlyexit.data import model_corpus

    return model_corpus(model_dir)[0]["test"]


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def write_results(name: str, result: dict, table: str, root: Path | str | None = None) -> Path:
    """results.json and results.md under <root or experiments/results>/<name>/ (root: tests write elsewhere)."""
    out = Path(root or os.environ.get("EARLYEXIT_RESULTS") or RESULTS) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    header = f"<!-- written by experiments/{name}.py at commit {result['stamp']['commit']} on {result['stamp']['machine']} -->\n"
    (out / "results.md").write_text(header + table + "\n")
    return out


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
