"""Fused exit-check kernels, installed as `earlyexit.kernels`; this module is their dispatcher.

`kernels/` has no `__init__.py`, on purpose: the top-level name `kernels` is the PyPI package that transformers
imports with every GPT-2 model, and a regular package of that name at the repository root would shadow it whenever
the root is on sys.path (`python -m` or `pytest` run there). The folder is the package `earlyexit.kernels` through
the link `earlyexit/kernels -> ../kernels`, in the source tree and in wheels alike.

Three kernels, each in its own file with its `@triton.jit` kernel(s), host launcher and
PyTorch reference:

- `exit_confidence`: layer norm (or none) + LM head + online-softmax statistics (argmax, max
  probability, top-1 minus top-2, entropy, log-sum-exp) without writing the logits;
  vocabulary split across programs and merged in a second stage (flash-decoding style).
  The confidence rule's exit check on a GPU (`ExitDecisions.confident_exit`).
- `layer_check`: the block's last residual add + exit layer norm + stop/exit/continue
  classifier in one launch.
- `state_copy`: ln_1 + K/V projection of the exit hidden state for every skipped layer,
  written straight into the KV cache, in one launch.

The functions below are the dispatcher the runtime calls: Triton for CUDA tensors, the
reference elsewhere (the reference *is* the CPU path). `backend="triton"` forces the
kernel, which on CPU tensors runs in Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported) — that is how CI without a GPU tests the kernels.
`last_backend[name]` records which path the latest call took, so tests can assert it.
"""

from __future__ import annotations

import os

import torch

from .exit_confidence import Confidence, exit_confidence_reference, exit_confidence_triton
from .layer_check import layer_check_reference, layer_check_triton
from .state_copy import StateCopyWeights, stack_state_copy_weights, state_copy_reference, state_copy_triton

BACKENDS = ("auto", "triton", "torch")
last_backend: dict[str, str] = {}


def _choose(name: str, tensor: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen = ("triton" if tensor.is_cuda else "torch") if backend == "auto" else backend
    if chosen == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    last_backend[name] = chosen
    return chosen


def exit_confidence(h, ln_weight, ln_bias, head_weight, eps: float = 1e-5, backend: str = "auto", **launch) -> Confidence:
    """Per-row argmax, max probability, margin, entropy and log-sum-exp of softmax(head_weight @ LN(h)); with
    ln_weight None, of softmax(head_weight @ h) (h already normalised)."""
    if _choose("exit_confidence", h, backend) == "triton":
        return exit_confidence_triton(h, ln_weight, ln_bias, head_weight, eps, **launch)
    return exit_confidence_reference(h, ln_weight, ln_bias, head_weight, eps)


def layer_check(x, delta, ln_weight, ln_bias, cls_weight, cls_bias, extra_bias=None, eps: float = 1e-5, backend: str = "auto", **launch):
    """(h = x + delta, action probabilities (B, 3) of softmax(cls @ LN(h) + bias [+ extra_bias]))."""
    if _choose("layer_check", x, backend) == "triton":
        return layer_check_triton(x, delta, ln_weight, ln_bias, cls_weight, cls_bias, extra_bias, eps, **launch)
    return layer_check_reference(x, delta, ln_weight, ln_bias, cls_weight, cls_bias, extra_bias, eps)


def state_copy(h, weights: StateCopyWeights, k_cache, v_cache, first_layer: int, n_layers: int, pos, backend: str = "auto",
               rows=None, **launch) -> None:
    """Fill layers first_layer..first_layer+n_layers-1 of the caches at `pos` from the exit hidden state h.

    Per-row positions (`pos` a (B,) tensor, `rows` the cache rows) take the reference path: the
    kernel writes one position for all rows.
    """
    ragged = isinstance(pos, torch.Tensor) or rows is not None
    if not ragged and _choose("state_copy", h, backend) == "triton":
        return state_copy_triton(h, weights, k_cache, v_cache, first_layer, n_layers, pos, **launch)
    if ragged:
        last_backend["state_copy"] = "torch"
    return state_copy_reference(h, weights, k_cache, v_cache, first_layer, n_layers, pos, rows)


__all__ = [
    "Confidence", "StateCopyWeights", "exit_confidence", "last_backend", "layer_check", "stack_state_copy_weights", "state_copy",
]
