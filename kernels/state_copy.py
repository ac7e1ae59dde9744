"""State-copy K/V fill: after a token exits at layer l, write the K/V of every skipped layer in one launch.

The layers a token skips still owe later tokens their keys and values at this position.
State copying (the study's choice, after CALM) feeds the exit hidden state h to each
skipped layer in place of the input it never received: K, V = split(ln_1(h) @ W_kv + b_kv).
Unfused that is two or three launches per skipped layer plus a copy into the cache; here
one launch covers every (layer, row, output tile) and stores straight into the cache.

Weights are passed stacked across all L layers (`stack_state_copy_weights`), so a
program finds its layer's parameters by offset: built once per model, reused every token.

Order in this file: weight stacking, reference (also the CPU path), kernel, launcher.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .row_stats import row_mean_rstd


class StateCopyWeights(NamedTuple):
    ln_weight: torch.Tensor  # (L, d) each layer's ln_1 scale
    ln_bias: torch.Tensor  # (L, d)
    kv_weight: torch.Tensor  # (L, 2d, d) the K then V rows of each layer's QKV projection
    kv_bias: torch.Tensor  # (L, 2d)
    eps: float


def stack_state_copy_weights(blocks) -> StateCopyWeights:
    """From our model's blocks (`GPT2.h`): ln_1 and the K/V part of c_attn, stacked over layers."""
    d = blocks[0].ln_1.weight.shape[0]
    return StateCopyWeights(
        torch.stack([b.ln_1.weight for b in blocks]).contiguous(),
        torch.stack([b.ln_1.bias for b in blocks]).contiguous(),
        torch.stack([b.attn.c_attn.weight_out_in[d:] for b in blocks]).contiguous(),
        torch.stack([b.attn.c_attn.bias[d:] for b in blocks]).contiguous(),
        blocks[0].ln_1.eps,
    )


def state_copy_reference(h, weights: StateCopyWeights, k_cache, v_cache, first_layer: int, n_layers: int, pos, rows=None) -> None:
    """Write K/V of layers first_layer..first_layer+n_layers-1 at `pos` for every row of h (B, d).

    Batched decoding passes `pos` as a (B,) tensor of per-row positions and `rows`, the cache
    rows h's rows belong to.
    """
    B, d = h.shape
    nh, hs = k_cache.shape[2], k_cache.shape[4]
    if isinstance(pos, torch.Tensor) or rows is not None:
        rows = torch.arange(B, device=h.device) if rows is None else rows
        pos = pos if isinstance(pos, torch.Tensor) else torch.full_like(rows, pos)
    for layer in range(first_layer, first_layer + n_layers):
        z = F.layer_norm(h.float(), (d,), weights.ln_weight[layer].float(), weights.ln_bias[layer].float(), weights.eps)
        kv = z @ weights.kv_weight[layer].float().t() + weights.kv_bias[layer].float()  # (B, 2d)
        k, v = kv.split(d, dim=-1)
        if rows is None:
            k_cache[layer, :, :, pos] = k.view(B, nh, hs).to(k_cache.dtype)
            v_cache[layer, :, :, pos] = v.view(B, nh, hs).to(v_cache.dtype)
        else:
            k_cache[layer, rows, :, pos] = k.view(B, nh, hs).to(k_cache.dtype)
            v_cache[layer, rows, :, pos] = v.view(B, nh, hs).to(v_cache.dtype)


@triton.jit
def _state_copy_kernel(
    h_ptr,  # (B, d) exit hidden state
    ln_w_ptr, ln_b_ptr,  # (L, d) stacked ln_1
    w_ptr, b_ptr,  # (L, 2d, d), (L, 2d) stacked K/V projection
    k_ptr, v_ptr,  # (L, B, nh, S, hs) caches, any strides
    first_layer, pos, d, hs, stride_h,
    sk_l, sk_b, sk_h, sk_s, sk_e,  # K cache strides
    sv_l, sv_b, sv_h, sv_s, sv_e,  # V cache strides
    eps,
    BLOCK_N: tl.constexpr,  # K/V output features per program
    BLOCK_D: tl.constexpr,  # hidden features per chunk
):
    layer = (first_layer + tl.program_id(0)).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < 2 * d
    h_row = h_ptr + row * stride_h
    mean, rstd = row_mean_rstd(h_row, d, eps, BLOCK_D)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        x = tl.load(h_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        g = tl.load(ln_w_ptr + layer * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        b = tl.load(ln_b_ptr + layer * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        z = tl.where(mask_d, (x - mean) * rstd * g + b, 0.0)
        w = tl.load(
            w_ptr + layer * 2 * d * d + offs_n.to(tl.int64)[:, None] * d + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * z[None, :], axis=1)
    acc += tl.load(b_ptr + layer * 2 * d + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    is_k = offs_n < d
    feature = tl.where(is_k, offs_n, offs_n - d)
    head, e = feature // hs, feature % hs
    k_off = layer * sk_l + row * sk_b + head * sk_h + pos * sk_s + e * sk_e
    v_off = layer * sv_l + row * sv_b + head * sv_h + pos * sv_s + e * sv_e
    tl.store(k_ptr + k_off, acc.to(k_ptr.dtype.element_ty), mask=mask_n & is_k)
    tl.store(v_ptr + v_off, acc.to(v_ptr.dtype.element_ty), mask=mask_n & (offs_n >= d))


def state_copy_triton(h, weights: StateCopyWeights, k_cache, v_cache, first_layer: int, n_layers: int, pos: int,
                      block_n: int = 64, block_d: int = 64, num_warps: int = 4) -> None:
    B, d = h.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == B and k_cache.shape[2] * k_cache.shape[4] == d
    assert 0 <= first_layer and first_layer + n_layers <= k_cache.shape[0] and 0 <= pos < k_cache.shape[3]
    if n_layers <= 0:
        return
    h = h.contiguous()
    block_d = min(block_d, triton.next_power_of_2(d))
    grid = (n_layers, B, triton.cdiv(2 * d, block_n))
    _state_copy_kernel[grid](
        h, weights.ln_weight, weights.ln_bias, weights.kv_weight, weights.kv_bias, k_cache, v_cache,
        first_layer, pos, d, k_cache.shape[4], h.stride(0), *k_cache.stride(), *v_cache.stride(), weights.eps,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
