"""What each layer of a frozen backbone says about token windows: its hidden states, each exit head's prediction,
and the stop / exit / continue labels those imply. The heads' training, the calibration and the experiments read
the layers through these, so they all see the same thing."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.heads import CONTINUE, EXIT, STOP, ExitHeads
from ..runtime.model import GPT2


def tokenize_until(files, tok, budget: int, seed: int) -> np.ndarray:
    """Files in a seeded order, tokenized and joined by EOS until `budget` tokens."""
    order = np.random.default_rng(seed).permutation(len(files))
    chunks, total = [], 0
    for i in order:
        ids = tok.encode(files[i]["text"]) + [tok.eos_token_id]
        chunks.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= budget:
            break
    return np.concatenate(chunks)


@torch.no_grad()
def layer_states(model: GPT2, x: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    """Every block's output for windows x (B, T): L tensors (B, T, d), float32."""
    cache = model.new_cache(x.shape[0], capacity=x.shape[1])
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cpu"):
        h = model.embed(x, 0)
        for layer in range(model.dims.n_layer):
            h = model.block(layer, h, cache, 0)
            out.append(h.float())
    return out


@torch.no_grad()
def layer_predictions(heads: ExitHeads, model: GPT2, states: list[torch.Tensor], bf16: bool = False) -> torch.Tensor:
    """argmax of every layer's head: (L, B, T); the last layer is the full model."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and states[0].device.type == "cpu"):
        return torch.stack([heads.head_logits(layer, h, model).argmax(-1) for layer, h in enumerate(states)])


def action_labels(preds: torch.Tensor, target: torch.Tensor, scheme: str) -> torch.Tensor:
    """(L, B, T) labels over (continue, exit, stop) from every layer's prediction and the reference."""
    full = preds[-1]
    if scheme == "agreement":
        labels = torch.where(preds == full, EXIT, CONTINUE)
        return torch.where((full != target)[None], STOP, labels)
    right = preds == target[None]
    right_so_far = right.cummax(dim=0).values
    labels = torch.where(right_so_far, EXIT, CONTINUE)
    return torch.where((~right.any(dim=0))[None], STOP, labels)


def previous_exit_layers(preds: torch.Tensor) -> torch.Tensor:
    """Teacher-forced stand-in for the previous token's exit layer (1..L, 0 for the first position):
    the first layer whose head agrees with the full model at the previous position."""
    agree = preds == preds[-1][None]  # (L, B, T)
    first = agree.float().argmax(dim=0) + 1  # (B, T), in 1..L (the last layer always agrees)
    return torch.cat([torch.zeros_like(first[:, :1]), first[:, :-1]], dim=1)
