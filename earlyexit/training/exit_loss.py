"""The early-exit training objective: a backbone asked to decide at every layer (LayerSkip's recipe, arXiv 2404.16710).

The study fits exit heads on a frozen backbone; a model we train ourselves can be taught to exit. Each step:

- **layer dropout rising with depth**: block l of L is skipped with probability p_l = p_max * l / (L - 1), the same
  blocks for the whole batch (so the compute is really saved), drawn from (seed, step) so a resumed run drops the
  same blocks. A skipped block passes its input on unchanged, as it would at decode time if the token had left.
- **an early-exit loss at the layers the curriculum enables**: exit l reads block l's output through its own
  LayerNorm (`ExitNorms`, one per block but the last, which keeps the model's `ln_f`; started as copies of `ln_f`,
  trained here and handed to the exit heads afterwards) and the shared, tied LM head. The rotational curriculum
  enables every `rotation`-th early layer, shifted by one each step, so every layer is trained every `rotation`
  steps while a step pays for about (L - 1) / rotation extra projections; those are taken on `positions` sampled
  positions of each window, not all of them. The last layer's loss is always on, over every position.
- **weights that grow with depth**, normalised over the layers enabled this step: layer l (0-based) weighs
  scale * (l + 1) / L, the last layer 1; a step's weights sum to 1 (`loss_weights`).
- optionally **self-distillation**: each enabled exit also pays kd * KL(p_last || p_l), the last layer's distribution
  detached, since what early exit needs is agreement with the full model rather than with the labels alone.

The forward is our own over transformers' `GPT2Block` modules (their LayerNorms, projections and MLP, with
`scaled_dot_product_attention` causal attention): the same function as `GPT2LMHeadModel` when nothing is dropped
(tested), but it can skip a block and return every layer's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EarlyExitError

CURRICULA = ("rotational", "all")


@dataclass(frozen=True)
class EarlyExitObjective:
    """What the objective asks of one step; `scale` 0 turns the early-exit losses off (layer dropout may stay)."""

    scale: float = 0.0  # weight of layer l's exit relative to the last layer's: scale * (l + 1) / L
    curriculum: str = "rotational"  # rotational: every `rotation`-th early layer per step; all: every layer, every step
    rotation: int = 3
    positions: int = 128  # positions of each window at which the early exits are scored; 0: all of them
    kd: float = 0.0  # weight of KL(p_last || p_l) beside each exit's cross-entropy
    layer_dropout: float = 0.0  # p_max: the last block's skip probability, 0 at the first block
    seed: int = 0

    def __post_init__(self):
        if self.curriculum not in CURRICULA:
            raise EarlyExitError(f"early_exit_curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        if self.scale < 0 or self.kd < 0:
            raise EarlyExitError("early_exit_scale and early_exit_kd must be >= 0")
        if self.rotation < 1 or self.positions < 0:
            raise EarlyExitError("early_exit_rotation must be >= 1 and early_exit_positions >= 0")
        if not 0.0 <= self.layer_dropout < 1.0:
            raise EarlyExitError(f"layer_dropout must be in [0, 1), got {self.layer_dropout}")

    @property
    def active(self) -> bool:
        return self.scale > 0 or self.layer_dropout > 0

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def dropped_layers(self, n_layer: int, step: int) -> list[bool]:
        """Which blocks this step skips: block l with probability layer_dropout * l / (n_layer - 1)."""
        if not self.layer_dropout or n_layer < 2:
            return [False] * n_layer
        p = torch.arange(n_layer, dtype=torch.float64) * (self.layer_dropout / (n_layer - 1))
        return (torch.rand(n_layer, generator=self.generator(step), dtype=torch.float64) < p).tolist()

    def exit_layers(self, n_layer: int, step: int, dropped: list[bool]) -> list[int]:
        """The early layers (0..n_layer-2) whose exit loss this step pays: the curriculum's, less dropped blocks."""
        if not self.scale:
            return []
        early = range(n_layer - 1)
        if self.curriculum == "rotational":
            early = [layer for layer in early if (layer + step) % self.rotation == 0]
        return [layer for layer in early if not dropped[layer]]

    def loss_weights(self, n_layer: int, layers: list[int]) -> dict[int, float]:
        """Normalised weights of the enabled early layers and the last (key n_layer - 1): they sum to 1."""
        raw = {layer: self.scale * (layer + 1) / n_layer for layer in layers}
        raw[n_layer - 1] = 1.0
        total = sum(raw.values())
        return {layer: w / total for layer, w in raw.items()}


class ExitNorms(nn.Module):
    """One LayerNorm per block but the last (which exits through the model's `ln_f`), started as copies of `ln_f`."""

    def __init__(self, ln_f: nn.LayerNorm, n_layer: int):
        super().__init__()
        self.ln = nn.ModuleList(nn.LayerNorm(ln_f.normalized_shape, eps=ln_f.eps) for _ in range(n_layer - 1))
        with torch.no_grad():
            for ln in self.ln:
                ln.weight.copy_(ln_f.weight)
                ln.bias.copy_(ln_f.bias)


def attention(block, x: torch.Tensor) -> torch.Tensor:
    """GPT-2 causal self-attention of a transformers `GPT2Block` on (B, T, C), without its cache machinery."""
    B, T, C = x.shape
    nh = block.attn.num_heads
    q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def block_forward(block, x: torch.Tensor) -> torch.Tensor:
    x = x + attention(block, x)
    return x + block.mlp(block.ln_2(x))


def layer_states(model, x: torch.Tensor, dropped: list[bool] | None = None, block_fn=block_forward) -> list[torch.Tensor]:
    """Every block's output (before `ln_f`) for token ids x (B, T); a dropped block's output is its input."""
    t = model.transformer
    if x.shape[1] > t.wpe.num_embeddings:
        raise EarlyExitError(f"{x.shape[1]} tokens exceed the model's {t.wpe.num_embeddings} positions")
    h = t.wte(x) + t.wpe(torch.arange(x.shape[1], device=x.device))  # (B, T, C)
    states = []
    for layer, block in enumerate(t.h):
        if not (dropped and dropped[layer]):
            h = block_fn(block, h)
        states.append(h)
    return states


def objective_loss(model, norms: ExitNorms, x: torch.Tensor, objective: EarlyExitObjective, step: int,
                   block_fn=block_forward) -> tuple[torch.Tensor, dict[int, float]]:
    """The step's loss for windows x (B, T+1) and each scored layer's cross-entropy (for the progress bar)."""
    inputs, targets = x[:, :-1], x[:, 1:]
    L = len(model.transformer.h)
    dropped = objective.dropped_layers(L, step)
    states = layer_states(model, inputs, dropped, block_fn)
    layers = objective.exit_layers(L, step, dropped)
    weights = objective.loss_weights(L, layers)
    head = model.lm_head.weight  # tied to wte: (V, C)
    last_logits = F.linear(model.transformer.ln_f(states[-1]), head).float()  # (B, T, V)
    last_ce = F.cross_entropy(last_logits.flatten(0, 1), targets.flatten())
    total, per_layer = weights[L - 1] * last_ce, {L - 1: last_ce.item()}
    if not layers:
        return total, per_layer
    T = inputs.shape[1]
    picked = (torch.randperm(T, generator=objective.generator(step))[:objective.positions].sort().values
              if 0 < objective.positions < T else torch.arange(T)).to(x.device)
    sub_targets = targets[:, picked].flatten()
    teacher = F.log_softmax(last_logits[:, picked].detach(), -1).flatten(0, 1) if objective.kd else None
    for layer in layers:
        logits = F.linear(norms.ln[layer](states[layer][:, picked]), head).float().flatten(0, 1)  # (B * P, V)
        ce = F.cross_entropy(logits, sub_targets)
        loss = ce
        if teacher is not None:
            loss = loss + objective.kd * F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
        total = total + weights[layer] * loss
        per_layer[layer] = ce.item()
    return total, per_layer


@torch.no_grad()
def layer_top1(model, norms: ExitNorms, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer next-token hits (L,) and the hits of the first layer agreeing with the last, for windows x (B, T+1)."""
    states = layer_states(model, x[:, :-1])
    head = model.lm_head.weight
    preds = torch.stack([F.linear((norms.ln[layer] if layer < len(states) - 1 else model.transformer.ln_f)(h), head).argmax(-1)
                         for layer, h in enumerate(states)])  # (L, B, T)
    right = (preds == x[:, 1:]).flatten(1).sum(1)
    agrees = (preds == preds[-1]).flatten(1).sum(1)
    return right, agrees
