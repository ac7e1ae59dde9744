"""Exit-head confidence: layer norm + LM head + online softmax statistics, never writing the logits.

The confidence rule's exit check on a GPU (`ExitDecisions.confident_exit`): the exit head's max probability decides
whether a token leaves. A head whose vector is already normalised (the exit heads' LN_l + low-rank adapter) passes
no layer norm (`ln_weight=None`), and the kernel projects it as it stands.

At an exit candidate we need to know how sure the head is, not the whole distribution:
per row, the argmax token, its probability, the gap to the runner-up, the entropy and
the log-sum-exp. The naive sequence writes a [B, V] logits tensor (V = 50,257 for GPT-2)
and reads it back four times; this kernel streams the LM head weight W once, tile by
tile, keeping running (max, second max, argmax, sum of exp, sum of exp * logit) like the
online softmax of flash attention and Liger's cross-entropy.

At batch 1 one row cannot fill a GPU, so the vocabulary is split across programs
(stage 1, grid = rows x splits) and the per-split partials are merged by a second small
kernel (stage 2, grid = rows), as flash-decoding merges its key splits.

Order in this file: reference (also the CPU path), stage-1 kernel, stage-2 kernel, launcher.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .row_stats import row_mean_rstd


class Confidence(NamedTuple):
    """Per-row statistics of softmax(W @ LN(h)) (or of softmax(W @ h) without a layer norm); all float32 but `token` (int64)."""

    token: torch.Tensor  # (B,) argmax, lowest index on ties
    max_prob: torch.Tensor  # (B,) p(token)
    margin: torch.Tensor  # (B,) p(top-1) - p(top-2)
    entropy: torch.Tensor  # (B,) nats
    lse: torch.Tensor  # (B,) log-sum-exp of the logits


# ----------------------------------------------------------------------------- reference

def exit_confidence_reference(h, ln_weight, ln_bias, head_weight, eps: float = 1e-5) -> Confidence:
    """PyTorch reference: materialises the (B, V) logits in float32. ln_weight None: h is projected as it stands."""
    z = h.float() if ln_weight is None else F.layer_norm(h.float(), (h.shape[-1],), ln_weight.float(), ln_bias.float(), eps)  # (B, d)
    logits = z @ head_weight.float().t()  # (B, V)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]
    p = logp.exp()
    top = logits.topk(2 if logits.shape[-1] > 1 else 1, dim=-1).values
    p_top = (top - lse[:, None]).exp()
    margin = p_top[:, 0] - (p_top[:, 1] if top.shape[-1] > 1 else 0.0)
    entropy = -(p * logp).sum(-1)
    return Confidence(logits.argmax(-1), p_top[:, 0], margin, entropy, lse)


# ----------------------------------------------------------------------------- stage 1

@triton.jit
def _head_input_chunk(h_row, ln_w_ptr, ln_b_ptr, offs_d, mask_d, mean, rstd, NORMALIZE: tl.constexpr):
    """Features offs_d of what the head projects: LN(h) with the row's statistics, or h itself; 0 where masked."""
    x = tl.load(h_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if NORMALIZE:
        g = tl.load(ln_w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        b = tl.load(ln_b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        x = tl.where(mask_d, (x - mean) * rstd * g + b, 0.0)
    return x


@triton.jit
def _exit_confidence_split_kernel(
    h_ptr,  # (B, d) hidden states after a block, fp32 or fp16
    ln_w_ptr, ln_b_ptr,  # (d,) the exit layer norm's scale and shift
    w_ptr,  # (V, d) LM head weight, row-major
    part_ptr,  # (B, n_splits, 5) float32 partials: max, second max, argmax, sum exp, sum exp * logit
    d, V, split_size, n_splits,
    stride_h, stride_w,
    eps,
    BLOCK_V: tl.constexpr,  # vocabulary rows per tile
    BLOCK_D: tl.constexpr,  # hidden features per chunk
    NORMALIZE: tl.constexpr,  # False: h is already the head's input (no layer norm; ln_w_ptr, ln_b_ptr unread)
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    h_row = h_ptr + row.to(tl.int64) * stride_h
    # Layer-norm statistics in one pass over the row; the normalised row is rebuilt per
    # chunk inside the vocabulary loop (d multiply-adds against BLOCK_V * d: negligible).
    mean, rstd = 0.0, 1.0
    if NORMALIZE:
        mean, rstd = row_mean_rstd(h_row, d, eps, BLOCK_D)

    m1 = -float("inf")  # running max logit
    m2 = -float("inf")  # running second-largest logit
    arg = 0  # index of m1
    s = 0.0  # sum of exp(logit - m1)
    t = 0.0  # sum of exp(logit - m1) * logit, for the entropy
    v_start = split * split_size
    for v0 in range(v_start, v_start + split_size, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = tl.zeros([BLOCK_V], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d
            z = _head_input_chunk(h_row, ln_w_ptr, ln_b_ptr, offs_d, mask_d, mean, rstd, NORMALIZE)
            w = tl.load(
                w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                mask=mask_v[:, None] & mask_d[None, :], other=0.0,
            ).to(tl.float32)
            logits += tl.sum(w * z[None, :], axis=1)
        logits = tl.where(mask_v, logits, -float("inf"))
        tile_max = tl.max(logits, axis=0)
        tile_arg = tl.argmax(logits, axis=0)  # first index on ties
        tile_second = tl.max(tl.where(offs_v == v0 + tile_arg, -float("inf"), logits), axis=0)
        # second max of the union: the loser of the two maxima, or either second
        m2 = tl.maximum(tl.minimum(m1, tile_max), tl.maximum(m2, tile_second))
        arg = tl.where(tile_max > m1, v0 + tile_arg, arg)  # strict: earlier tiles win ties
        new_m = tl.maximum(m1, tile_max)
        scale = tl.exp(m1 - new_m)
        e = tl.where(mask_v, tl.exp(logits - new_m), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        t = t * scale + tl.sum(e * tl.where(mask_v, logits, 0.0), axis=0)  # masked: 0 * 0, never 0 * -inf
        m1 = new_m
    out = part_ptr + (row.to(tl.int64) * n_splits + split) * 5
    tl.store(out + 0, m1)
    tl.store(out + 1, m2)
    tl.store(out + 2, arg.to(tl.float32))
    tl.store(out + 3, s)
    tl.store(out + 4, t)


# ----------------------------------------------------------------------------- stage 2

@triton.jit
def _exit_confidence_merge_kernel(
    part_ptr,  # (B, n_splits, 5) partials from stage 1
    token_ptr,  # (B,) int64 out
    stats_ptr,  # (B, 4) float32 out: max_prob, margin, entropy, lse
    n_splits,
    BLOCK_S: tl.constexpr,  # >= n_splits, a power of two
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    mask = offs < n_splits
    base = part_ptr + row.to(tl.int64) * n_splits * 5 + offs * 5
    m1 = tl.load(base + 0, mask=mask, other=-float("inf"))
    m2 = tl.load(base + 1, mask=mask, other=-float("inf"))
    arg = tl.load(base + 2, mask=mask, other=0.0)
    s = tl.load(base + 3, mask=mask, other=0.0)
    t = tl.load(base + 4, mask=mask, other=0.0)
    best = tl.max(m1, axis=0)
    winner = tl.argmax(m1, axis=0)  # first split on ties: the lowest vocabulary index
    scale = tl.where(mask, tl.exp(m1 - best), 0.0)
    total_s = tl.sum(s * scale, axis=0)
    total_t = tl.sum(t * scale, axis=0)
    lse = best + tl.log(total_s)
    # runner-up: the best of the other splits' maxima, or the winning split's own second
    others = tl.max(tl.where(offs == winner, -float("inf"), m1), axis=0)
    own_second = tl.max(tl.where(offs == winner, m2, -float("inf")), axis=0)
    second = tl.maximum(others, own_second)
    token = tl.sum(tl.where(offs == winner, arg, 0.0), axis=0)
    max_prob = tl.exp(best - lse)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(stats_ptr + row * 4 + 0, max_prob)
    tl.store(stats_ptr + row * 4 + 1, max_prob - tl.exp(second - lse))
    tl.store(stats_ptr + row * 4 + 2, lse - total_t / total_s)
    tl.store(stats_ptr + row * 4 + 3, lse)


# ----------------------------------------------------------------------------- launcher

def split_plan(B: int, V: int, block_v: int, target_programs: int) -> tuple[int, int]:
    """(split_size, n_splits): enough programs to fill the device, each split a whole number of tiles."""
    tiles = triton.cdiv(V, block_v)
    wanted = max(1, min(tiles, target_programs // max(B, 1)))
    split_size = triton.cdiv(tiles, wanted) * block_v
    return split_size, triton.cdiv(V, split_size)


def exit_confidence_triton(
    h, ln_weight, ln_bias, head_weight, eps: float = 1e-5,
    block_v: int = 128, block_d: int = 64, target_programs: int = 512, num_warps: int = 4,
) -> Confidence:
    """Launch both stages. Float32 accumulation whatever the input dtype; every split is non-empty.
    ln_weight (and ln_bias) None: h is the head's input as it stands."""
    assert h.dim() == 2 and head_weight.dim() == 2 and h.shape[1] == head_weight.shape[1]
    h, head_weight = h.contiguous(), head_weight.contiguous()
    normalize = ln_weight is not None
    ln_weight, ln_bias = (ln_weight.contiguous(), ln_bias.contiguous()) if normalize else (h, h)  # unread without a norm
    B, d = h.shape
    V = head_weight.shape[0]
    block_d = min(block_d, triton.next_power_of_2(d))
    split_size, n_splits = split_plan(B, V, block_v, target_programs)
    partials = torch.empty((B, n_splits, 5), dtype=torch.float32, device=h.device)
    _exit_confidence_split_kernel[(B, n_splits)](
        h, ln_weight, ln_bias, head_weight, partials, d, V, split_size, n_splits,
        h.stride(0), head_weight.stride(0), eps, BLOCK_V=block_v, BLOCK_D=block_d, NORMALIZE=normalize, num_warps=num_warps,
    )
    token = torch.empty(B, dtype=torch.int64, device=h.device)
    stats = torch.empty((B, 4), dtype=torch.float32, device=h.device)
    _exit_confidence_merge_kernel[(B,)](partials, token, stats, n_splits, BLOCK_S=triton.next_power_of_2(n_splits))
    return Confidence(token, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3])
