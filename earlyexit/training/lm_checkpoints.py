"""The recipe's model on disk: built from the recipe, started from an export (`init_from`, optionally grown
deeper), checkpointed atomically for `--resume`, and exported (fp16 safetensors + tokenizer + training_state.json)
as what ships."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..config import to_dict
from ..errors import EarlyExitError
from ..runtime.heads import EXIT_NORMS
from .lm_config import LMTrainConfig


def build_model(cfg: LMTrainConfig, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def grown_layer_sources(old: int, new: int) -> list[int]:
    """For each layer of a model grown from `old` to `new` layers, the export layer it starts from: each once, in
    order, and the new layers (a repeat of the layer before) spread evenly. 12 -> 16: 0 0 1 2 3 3 4 5 6 6 7 8 9 9 10 11."""
    return [j * old // new for j in range(new)]


def init_from_export(model, tok, path: Path, grow_layers: bool = False) -> tuple[int, int]:
    """Load an exported model's weights into `model` (built from this recipe); returns its (step, tokens seen).

    Position embeddings past the export's context (it keeps `seq_len` rows) stay as initialised. With
    `grow_layers`, a model of more layers than the export starts as the export: see `grown_layer_sources`; each new
    layer's attention and MLP output projections are zero, so it adds nothing to the residual stream until trained.
    """
    import re

    from ..runtime.loading import load_hf_model, load_tokenizer

    if load_tokenizer(path).get_vocab() != tok.get_vocab():
        raise EarlyExitError(f"init_from: {path} has a different tokenizer from {tok.name_or_path}")
    exported = load_hf_model(path)
    source = exported.state_dict()
    old, new = exported.config.n_layer, model.config.n_layer
    if old != new and not (grow_layers and old < new):
        raise EarlyExitError(f"init_from: {path} has {old} layers, the recipe builds {new}"
                             + ("" if old > new else " (grow_layers=true starts the deeper model from it)"))
    sources = grown_layer_sources(old, new)
    target = model.state_dict()
    for name, value in target.items():
        layer = re.match(r"transformer\.h\.(\d+)\.(.*)", name)
        fresh = False
        if layer:
            j = int(layer[1])
            fresh = j > 0 and sources[j] == sources[j - 1]
            name = f"transformer.h.{sources[j]}.{layer[2]}"
        if name not in source:
            raise EarlyExitError(f"init_from: {path} has no tensor {name}: not a model of this recipe's shape")
        got = source[name]
        if name.endswith("wpe.weight") and got.shape[1:] == value.shape[1:] and got.shape[0] <= value.shape[0]:
            value[:got.shape[0]] = got
        elif got.shape != value.shape:
            raise EarlyExitError(f"init_from: {name} is {tuple(got.shape)} in {path}, the recipe builds {tuple(value.shape)}")
        elif fresh and ".c_proj." in name:
            value.zero_()
        else:
            value.copy_(got)
    state_path = path / "training_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    return int(state.get("step", 0)), int(state.get("tokens_seen", 0))


def atomic_save(state: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename: an interruption leaves the previous checkpoint whole."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model, optimizer, step: int, tokens_seen: int, norms=None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "tokens_seen": tokens_seen}
    if norms is not None:
        state["exit_norms"] = norms.state_dict()
    atomic_save(state, path)


def read_curve(log_path: Path) -> list[dict]:
    """The evaluation points of a training log (step, tokens seen, validation loss and top-1), each tagged with
    the log's work_dir: validation is that run's corpus's split, so points of different work_dirs do not compare."""
    if not log_path.exists():
        return []
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keep = ("step", "tokens_seen", "val_loss", "val_top1", "tok_s")
    return [{**{k: r[k] for k in keep if k in r}, "work_dir": str(log_path.parent)} for r in rows if "val_loss" in r]


def training_curve(cfg: LMTrainConfig) -> list[dict]:
    """This run's evaluation points, after those of the export it started from (`init_from`), if any.

    A point of both (the export lies in this work_dir, or its run's log survived) is kept once, as the log has it,
    so re-exporting over `init_from` never duplicates the inherited curve.
    """
    inherited = []
    if cfg.init_from and (Path(cfg.init_from) / "training_state.json").is_file():
        before = json.loads((Path(cfg.init_from) / "training_state.json").read_text())
        where = before.get("config", {}).get("work_dir", cfg.init_from)
        inherited = [{"work_dir": where, **r} for r in before.get("curve", []) if r["step"] <= cfg.rewarm_at]
    logged = read_curve(Path(cfg.work_dir) / "log.jsonl")
    in_log = {(r["work_dir"], r["step"]) for r in logged}
    merged = [r for r in inherited if (r["work_dir"], r["step"]) not in in_log] + logged
    return sorted(merged, key=lambda r: r["step"])


def trained_context_model(state: dict, tok, cfg: LMTrainConfig):
    """A `GPT2LMHeadModel` of the recipe's shape holding `state`, its context cut to the `seq_len` positions it trained."""
    model = build_model(dataclasses.replace(cfg, n_positions=cfg.seq_len), tok)
    model.load_state_dict({k: v[:cfg.seq_len] if k.endswith("wpe.weight") else v for k, v in state.items()})
    return model


def export(model, tok, cfg: LMTrainConfig, step: int, tokens_seen: int, meta: dict, last_eval: dict, norms=None) -> None:
    """fp16 safetensors + tokenizer + training_state.json: what ships as the default model.

    The exported context is `seq_len`, not `n_positions`: position embeddings past the
    training windows never received a gradient (weight decay only shrinks them), and a
    prompt reaching into them makes the model degenerate. Cropping them turns such a prompt
    into the runtime's clear "longer than the context" error or its left-truncation.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained_context_model(model.state_dict(), tok, cfg).to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if norms is not None:  # what train_heads starts the exit heads' layer norms from
        from safetensors.torch import save_file

        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in norms.state_dict().items()}, str(out / EXIT_NORMS))
    state = {
        "step": step, "tokens_seen": tokens_seen, "config": to_dict(cfg), "corpus": meta, "last_eval": last_eval,
        "curve": training_curve(cfg),
    }
    (out / "training_state.json").write_text(json.dumps(state, indent=2))


