"""The model card's measurements: a trained backbone evaluated on the held-out splits of the corpus it was trained on.

`evaluate` rebuilds that corpus split from `training_state.json`, then measures in phases: loss, perplexity and
next-token top-1 per split (`lm_metrics`), line completion at random points inside test lines, with and without
token healing and the n-gram cache (`line_completions`), the study's token completions, and sample completions as
the model alone and as the CLI writes them (`sample_completions`). The result is the dict eval.json keeps, which
`card_render` turns into the card.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backbone_quality import completion_metrics, lm_metrics
from ..config import to_dict
from ..errors import EarlyExitError
from ..provenance import git_commit, machine
from ..runtime.ngram_cache import DEFAULT_WEIGHT as DEFAULT_CACHE_WEIGHT
from .card_evidence import recipe_evidence


@dataclass
class ModelCardConfig:
    loss_windows: int = 256
    seq_len: int = 256
    line_examples: int = 300
    token_examples: int = 300
    target_tokens: int = 10
    max_line_tokens: int = 32
    seed: int = 0
    shown_line_examples: int = 8  # line completions shown in the card as scored, with where they all go wrong
    sample_max_new_tokens: int = 40
    sample_prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):\n"])
    cache_weight: float = DEFAULT_CACHE_WEIGHT  # the n-gram cache's, as the CLI runs it (earlyexit.runtime.ngram_cache)


def corpus_splits(state: dict):
    from ..data.corpus import trained_corpus

    cfg = state["config"]
    splits, stats = trained_corpus(state)
    trained_on = Path(cfg.get("work_dir", "")) / "files_train.txt"
    if trained_on.is_file() and trained_on.read_text() != "".join(r["path"] + "\n" for r in splits["train"]):
        print("warning: the training files on this machine differ from those the model was trained on (installed package "
              "versions changed?): held-out figures may include files seen in training", file=sys.stderr)
    return splits, stats



def training_state(model_dir: Path, log: Path | None = None) -> dict:
    """What train_lm left beside the model: its config, step, corpus and curve (the curve read from `log` if given)."""
    state_file = model_dir / "training_state.json"
    if not state_file.is_file():
        raise EarlyExitError(f"{model_dir} has no training_state.json: model cards are written for models trained by earlyexit.training.train_lm")
    state = json.loads(state_file.read_text())
    if log is not None:
        from ..training.lm_checkpoints import read_curve

        state["curve"] = read_curve(log)
    return state


def line_completions(model, tok, test: list, cfg: ModelCardConfig) -> dict:
    """Line completion on the same cuts of test lines, with each of the runtime's aids in turn."""
    from ..data.corpus import line_cut_examples

    lines = line_cut_examples(test, cfg.line_examples, seed=cfg.seed)
    out = {"line_completion": completion_metrics(model, tok, lines, cfg.max_line_tokens, True, "line completion (healed)", healing=True,
                                                 shown=cfg.shown_line_examples)}
    out["line_completion_no_healing"] = completion_metrics(model, tok, lines, cfg.max_line_tokens, True, "line completion (raw)")
    # the quality curve's measure (experiments/quality_curve.py): healing backs off the last token only, as it did when the
    # curve began, so its phases compare
    out["line_completion_one_token_healing"] = completion_metrics(model, tok, lines, cfg.max_line_tokens, True,
                                                                  "line completion (one-token healing)", healing=True, healing_mode="token")
    # the CLI's n-gram cache, over the same prompts, and over the whole file above each cut (as an editor gives it;
    # the model still sees the last context-full of tokens, the cache all of it): the same cuts and targets
    out["line_completion_cached"] = completion_metrics(model, tok, lines, cfg.max_line_tokens, True, "line completion (healed, cache)",
                                                       healing=True, cache_weight=cfg.cache_weight)
    whole_file = line_cut_examples(test, cfg.line_examples, max_prompt_chars=10 ** 12, seed=cfg.seed)
    out["line_completion_whole_file"] = completion_metrics(model, tok, whole_file, cfg.max_line_tokens, True,
                                                           "line completion (whole file, healed, cache)", healing=True,
                                                           cache_weight=cfg.cache_weight)
    out["line_completion_whole_file_no_cache"] = completion_metrics(model, tok, whole_file, cfg.max_line_tokens, True,
                                                                    "line completion (whole file, healed)", healing=True)
    return out


def sample_completions(model, tok, cfg: ModelCardConfig) -> dict:
    """Each sample prompt completed by the model alone and as the CLI writes it, with the rates of degenerate ones."""
    from ..runtime.decoding import GenerationSettings, complete

    from .metrics import is_degenerate

    samples = []
    for prompt in cfg.sample_prompts:
        # with token healing, as the CLI runs them: a prompt ending in a newline cut the model's usual ":\n    " token
        alone = complete(model, tok, prompt, GenerationSettings(max_new_tokens=cfg.sample_max_new_tokens, token_healing=True))
        # and with the CLI's other defaults, the n-gram cache and the repetition stop: a loop ends with one copy kept
        cli = complete(model, tok, prompt, GenerationSettings(max_new_tokens=cfg.sample_max_new_tokens, token_healing=True, stop_on_repetition=True,
                                                              cache_weight=cfg.cache_weight))
        samples.append({"prompt": prompt, "completion": alone.text, "degenerate": is_degenerate(alone.token_ids),
                        "cli_completion": cli.text, "cli_finish": cli.finish_reason, "cli_degenerate": is_degenerate(cli.token_ids)})
    return {"samples": samples,
            "samples_degenerate_rate": sum(s["degenerate"] for s in samples) / max(1, len(samples)),
            "samples_cli_degenerate_rate": sum(s["cli_degenerate"] for s in samples) / max(1, len(samples))}


def evaluate(model_dir: Path, cfg: ModelCardConfig, log: Path | None = None) -> dict:
    """Every figure of the card for the model in `model_dir`, in eval.json's order, with the experiments' evidence."""
    from ..data.corpus import token_cut_examples
    from ..runtime.loading import load_hf_model, load_tokenizer
    from ..runtime.model import GPT2

    state = training_state(model_dir, log)
    hf, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    model = GPT2.from_hf(hf)
    splits, stats = corpus_splits(state)
    t0 = time.time()
    result = {
        "model_dir": str(model_dir), "commit": git_commit(), "machine": machine(), "config": to_dict(cfg),
        "parameters": sum(p.numel() for p in hf.parameters()),
        "disk_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "training": {k: state[k] for k in ("step", "tokens_seen", "config", "curve") if k in state},
        "corpus": {**state["corpus"], "stats": dataclasses.asdict(stats)},  # splits as evaluated (the test split's near-duplicates removed)
        "validation": lm_metrics(hf, tok, splits["validation"], cfg.loss_windows, cfg.seq_len),
        "test": lm_metrics(hf, tok, splits["test"], cfg.loss_windows, cfg.seq_len),
    }
    result.update(line_completions(model, tok, splits["test"], cfg))
    cuts = token_cut_examples(splits["test"], tok, cfg.token_examples, cfg.target_tokens, seed=cfg.seed)
    result["token_completion"] = completion_metrics(model, tok, cuts, cfg.target_tokens, False, f"{cfg.target_tokens}-token completion")
    result.update(sample_completions(model, tok, cfg))
    result.update(recipe_evidence())
    result["eval_seconds"] = time.time() - t0
    return result
