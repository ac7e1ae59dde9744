"""The recipe's data: the corpus read once, a tokenizer trained (or inherited from `init_from`) on its training
split, each split tokenized into `work_dir/tokens_<split>.npy`, and the batch of a step as a pure function of
(seed, step), so a resumed run sees what an uninterrupted one would have."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..data.corpus import SPLITS
from ..errors import EarlyExitError
from .lm_config import LMTrainConfig


def prepare_data(cfg: LMTrainConfig):
    """Tokenizer and tokenized splits, built once and cached in work_dir."""
    from transformers import AutoTokenizer

    from ..data.corpus import read_configured_corpus
    from ..data.tokenizer import train_tokenizer

    work = Path(cfg.work_dir)
    tok_dir = work / "tokenizer"
    meta_path = work / "corpus.json"
    if not (tok_dir / "tokenizer.json").exists() or not meta_path.exists():
        print(f"reading corpus {cfg.sources} ...", file=sys.stderr)
        splits, stats = read_configured_corpus(cfg)
        print(f"corpus: {stats}", file=sys.stderr)
        if cfg.init_from and not (tok_dir / "tokenizer.json").exists():
            # the weights to start from fix the tokenizer: a new one trained on this corpus could never match them
            tok = inherited_tokenizer(Path(cfg.init_from), tok_dir, cfg.vocab_size)
        else:
            tok = train_tokenizer([r["text"] for r in splits["train"]], cfg.vocab_size, tok_dir, cfg.tokenizer_train_bytes, cfg.seed)
        for split, rows in splits.items():
            encode_split(tok, rows, work, split)
        meta = {"stats": dataclasses.asdict(stats), "tokens": {s: int(np.load(work / f"tokens_{s}.npy", mmap_mode="r").shape[0]) for s in splits}}
        meta_path.write_text(json.dumps(meta, indent=2))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    meta = json.loads(meta_path.read_text())
    if not all((work / f"tokens_{s}.npy").exists() for s in SPLITS):
        print("token caches missing: re-encoding the corpus with the existing tokenizer ...", file=sys.stderr)
        splits, stats = read_configured_corpus(cfg)
        for split in ("train", "validation"):  # the test split may have changed (near-duplicate filtering); these may not
            listed = work / f"files_{split}.txt"
            if listed.exists() and listed.read_text() != "".join(r["path"] + "\n" for r in splits[split]):
                raise EarlyExitError(f"the {split} files on this machine differ from those {work} was trained on ({listed}): start a new work_dir")
        for split, rows in splits.items():
            encode_split(tok, rows, work, split)
    tokens = {s: np.load(work / f"tokens_{s}.npy", mmap_mode="r") for s in SPLITS}
    return tok, tokens, meta




def inherited_tokenizer(export_dir: Path, tok_dir: Path, vocab_size: int):
    """The tokenizer of the export an `init_from` run starts from, saved into this run's tok_dir."""
    from ..runtime.loading import load_tokenizer

    tok = load_tokenizer(export_dir)
    if len(tok) != vocab_size:
        raise EarlyExitError(f"init_from: {export_dir}'s tokenizer has {len(tok)} tokens, the recipe's vocab_size is {vocab_size}")
    tok.save_pretrained(str(tok_dir))
    return tok


def encode_split(tok, rows: list[dict], work: Path, split: str) -> None:
    """One split as a flat EOS-joined uint16 token stream, plus its file list."""
    encoded = tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    flat = np.fromiter((t for ids in encoded for t in (*ids, tok.eos_token_id)), dtype=np.uint16)
    np.save(work / f"tokens_{split}.npy", flat)
    (work / f"files_{split}.txt").write_text("".join(r["path"] + "\n" for r in rows))


def batch_at(tokens: np.ndarray, cfg: LMTrainConfig, step: int, micro: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The micro-batch for (step, micro) of this rank: windows of seq_len+1 in a seeded per-epoch order. A step's
    world * grad_accum micro-batches are consecutive windows, so two ranks of batch b see what one process of
    batch 2b sees."""
    from ..data.corpus import window_batch

    first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    return window_batch(tokens, cfg.seq_len, first, cfg.batch_size, cfg.seed)
