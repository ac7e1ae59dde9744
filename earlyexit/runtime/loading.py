"""Find, check and load GPT-2 checkpoints: the embedded default, a local directory, or a model in memory.

Every failure a user can cause (a missing directory, a checkpoint that is not GPT-2, a
corrupt weights file, a missing tokenizer) becomes one `EarlyExitError` line, never a
traceback from inside transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import EarlyExitError
from .lean_step import attach_lean_step
from .model import GPT2

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


def resolve_model_dir(model: str | Path | None) -> Path:
    """`None` -> the embedded default; otherwise a directory that must hold a GPT-2 config."""
    try:
        path = DEFAULT_MODEL_DIR if model is None else Path(model).expanduser()
    except RuntimeError:  # `~nosuchuser/...`: no such home directory
        raise EarlyExitError(f"model directory not found: {model} (no such user's home)") from None
    if not path.exists():
        raise EarlyExitError(f"model directory not found: {path}")
    if not path.is_dir():
        raise EarlyExitError(f"--model must be a directory holding config.json and weights, got a file: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EarlyExitError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise EarlyExitError(f"{config_file} is not valid JSON") from None
    if model_type != "gpt2":
        raise EarlyExitError(f"{path} holds a {model_type!r} model; earlyexit runs GPT-2 (model_type 'gpt2') only")
    return path


def load_hf_model(model_dir: str | Path | None = None):
    """The `GPT2LMHeadModel` in `model_dir` (default: the embedded model), in fp32, eval mode."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    path = resolve_model_dir(model_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    # a per-tensor loading bar is noise in a completion tool  # missing/unexpected-key chatter is turned into our own errors below
    hf_logging.disable_progress_bar()
    try:
        hf, info = GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # torch, transformers and safetensors raise many types for a foreign or truncated file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in str(e).lower():  # torch's message goes on to advise unpickling it anyway
            raise EarlyExitError(f"refusing to load the pickle in {path}: it holds objects other than tensors, and unpickling "
                                 "can run code; convert it to safetensors where it comes from a source you trust") from None
        named = "" if isinstance(e, (OSError, ValueError, RuntimeError)) else f"{type(e).__name__}: "
        raise EarlyExitError(f"cannot load the model weights in {path}: {named}{first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise EarlyExitError(f"the weights in {path} lack {len(missing)} GPT-2 tensors (e.g. {missing[0]}): corrupt or not GPT-2")
    for name, tensor in hf.state_dict().items():  # a NaN would decode to an empty completion, silently
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise EarlyExitError(f"the weights in {path} hold NaN or infinite values (in {name}): corrupt")
    return hf.eval()


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer's file, or a slow GPT-2 one's (beside merges.txt)


def load_tokenizer(model_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_dir(model_dir)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: every prompt would encode to nothing
        raise EarlyExitError(f"no tokenizer in {path}: it needs tokenizer.json, or vocab.json and merges.txt")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EarlyExitError(f"cannot load a tokenizer from {path}: {first}") from None


def load_runtime_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(our GPT2, tokenizer) for a directory, or for the embedded default when `model` is None."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = load_hf_model(model)
    runtime, tok = GPT2.from_hf(hf, dtype=dtype), load_tokenizer(model)
    if len(tok) > runtime.dims.vocab_size:  # its ids past the model's vocabulary would index past the embedding
        raise EarlyExitError(f"the tokenizer in {resolve_model_dir(model)} has {len(tok):,} tokens, more than the model's "
                             f"vocabulary of {runtime.dims.vocab_size:,}: they do not belong together")
    return attach_lean_step(runtime), tok
