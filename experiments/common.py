"""What every experiment script shares: the stamp on its results, prompts from the test split, output files."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Run as `python experiments/<script>.py`, sys.path[0] is experiments/, and an `earlyexit` installed in site-packages
# (a non-editable `pip install .`, as the README's main-job command does) would be the one measured, not this tree's:
# the checkout goes first. (Its kernels/ folder has no __init__.py, so it never shadows the PyPI `kernels`.)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from earlyexit.provenance import git_commit, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STARTED = time.time()  # the wall time a results file reports is counted from here (this module's import)


def stamp(model: str, config: dict) -> dict:
    """Commit, machine, model and config: what a reader needs to trust or rerun a result."""
    return {"commit": git_commit(), "machine": machine(), "model": model, "config": config, "argv": sys.argv}


def test_split_files(model_dir: Path, data: str | None = None) -> list[dict[str, str]]:
    """The evaluation files: `data` when given (a directory of .py files, a local data file or a `datasets`
    name, see earlyexit.data.corpus.load_eval_files), else the test split the model was trained beside."""
    from earlyexit.data.corpus import load_eval_files, model_corpus

    if data:
        return load_eval_files(data)
    return model_corpus(model_dir)[0]["test"]


def load_model_and_heads(model_dir: Path | str):
    """The runtime model in `model_dir`, its tokenizer and its exit heads: (model, tok, heads)."""
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import load_runtime_model

    model, tok = load_runtime_model(model_dir)
    return model, tok, load_heads(model_dir, model)


DATA_HELP = ("evaluation files instead of the model's test split: a directory of .py files, a .json/.jsonl/.parquet/.csv "
             "file or save_to_disk folder with a code column, or a datasets hub name")


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def results_dir(name: str, root: Path | str | None = None) -> Path:
    """Where experiment `name` writes: <root, else $EARLYEXIT_RESULTS (tests write elsewhere), else experiments/results>/<name>."""
    return Path(root or os.environ.get("EARLYEXIT_RESULTS") or RESULTS) / name


def write_results(name: str, result: dict, table: str, root: Path | str | None = None, script: str | None = None) -> Path:
    """results.json and results.md under results_dir(name, root); `script` (default `name`.py) wrote them."""
    out = results_dir(name, root)
    out.mkdir(parents=True, exist_ok=True)
    result["stamp"]["wall_seconds"] = round(time.time() - STARTED, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    header = f"<!-- written by experiments/{script or name + '.py'} at commit {result['stamp']['commit']} on {result['stamp']['machine']} -->\n"
    (out / "results.md").write_text(header + table + "\n")
    return out


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def our_engine(model, tok, policy, stop_strings=()):
    """A runner (ids, max_new) -> (token ids, seconds, per-token ms, Completion) over earlyexit.runtime.decoding."""
    import time

    from earlyexit.runtime.decoding import GenerationSettings, complete

    def run(ids: list[int], max_new: int):
        t0 = time.perf_counter()
        c = complete(model, tok, ids, GenerationSettings(max_new_tokens=max_new, stop_strings=stop_strings), policy=policy)
        return c.token_ids, time.perf_counter() - t0, c.token_ms, c

    return run



def experiment_main(argv, doc: str, config_cls: type, run, limit_help: str) -> int:
    """The command line every experiment shares: --config, key=value overrides, --model, --data, --limit;
    `run(args, config)` does the work, and a bad input is one `error:` line and exit code 2."""
    from earlyexit.config import config_parser, exit_code, load_config

    parser = config_parser(doc.split("\n\n")[0], config_cls)
    parser.add_argument("--model", help="GPT-2 checkpoint directory with exit heads (default: the embedded model)")
    parser.add_argument("--data", help=DATA_HELP)
    parser.add_argument("--limit", type=int, help=limit_help)
    args = parser.parse_args(argv)
    return exit_code(lambda: run(args, load_config(config_cls, args.config, args.overrides)))


def training_experiment_main(argv, doc: str, config_cls: type, name: str, model: str, compute, render, plot) -> int:
    """The command line of an experiment that trains models or reads training checkpoints instead of loading a
    runtime model: --config and key=value overrides. `compute(config)` returns the result (a dict), written
    as results/<name>/ with `render(config, result)` as its table and `plot(result, out)` unless plot=false;
    `model` says what was measured, for the stamp. A bad input is one `error:` line and exit code 2."""
    from earlyexit.config import config_parser, exit_code, load_config, to_dict

    args = config_parser(doc.split("\n\n")[0], config_cls).parse_args(argv)

    def body():
        cfg = load_config(config_cls, args.config, args.overrides)
        if getattr(cfg, "threads", 0):  # the runs set it themselves; the stamp should name what they ran with
            set_threads(cfg.threads)
        result = {"stamp": stamp(model, to_dict(cfg)), **compute(cfg)}
        out = write_results(name, result, render(cfg, result))
        if cfg.plot:
            plot(result, out)
        print(render(cfg, result))
        print(f"wrote {out}")

    return exit_code(body)
