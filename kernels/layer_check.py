"""Layer-plus-classifier check: the block's last residual add, the exit layer norm and the action classifier in one launch.

After block l the runtime needs two things: the block's output h = x + mlp_out (the next
block's input) and the controller's decision, softmax(C @ LN(h) + bias) over
(continue, exit, stop). Unfused that is an add, a layer norm, a tiny matmul and a softmax,
four launches that each read the row again. Here each program owns one row, holds it in
registers (d <= a few thousand), writes h once and the three probabilities.

Order in this file: reference (also the CPU path), kernel, launcher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

N_ACTIONS = 3  # continue, exit, stop


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def layer_check_reference(x, delta, ln_weight, ln_bias, cls_weight, cls_bias, extra_bias=None, eps: float = 1e-5):
    """h = x + delta in x's dtype; action probabilities (B, 3) in float32 from LN(h) in float32.

    On the CPU this runs after every block of every token, so it is kept to four ops for fp32 inputs.
    """
    h = x + delta
    z = F.layer_norm(_f32(h), (h.shape[-1],), _f32(ln_weight), _f32(ln_bias), eps)
    bias = _f32(cls_bias) if extra_bias is None else _f32(cls_bias) + _f32(extra_bias)
    return h, torch.addmm(bias, z, _f32(cls_weight).t()).softmax(-1)  # (B, 3)


@triton.jit
def _layer_check_kernel(
    x_ptr, delta_ptr,  # (B, d) residual stream and the block's last branch output
    h_ptr,  # (B, d) out: x + delta, in x's dtype
    ln_w_ptr, ln_b_ptr,  # (d,) exit layer norm
    c_w_ptr, c_b_ptr,  # (3, d), (3,) action classifier
    extra_ptr,  # (B, 3) per-row logit bias from cheap features (layer, previous exit); unused if not HAS_EXTRA
    probs_ptr,  # (B, 3) float32 out
    d, stride_x, stride_delta, stride_h, eps,
    HAS_EXTRA: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= d, a power of two: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < d
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0)
    h = x + delta
    tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    hf = h.to(tl.float32)
    mean = tl.sum(hf, axis=0) / d
    centered = tl.where(mask, hf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / d + eps)
    g = tl.load(ln_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ln_b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, centered * rstd * g + b, 0.0)
    # three dot products, unrolled: a (3, BLOCK_D) tile would need a padded 4th row
    l0 = tl.sum(z * tl.load(c_w_ptr + offs, mask=mask, other=0.0).to(tl.float32), axis=0) + tl.load(c_b_ptr + 0).to(tl.float32)
    l1 = tl.sum(z * tl.load(c_w_ptr + d + offs, mask=mask, other=0.0).to(tl.float32), axis=0) + tl.load(c_b_ptr + 1).to(tl.float32)
    l2 = tl.sum(z * tl.load(c_w_ptr + 2 * d + offs, mask=mask, other=0.0).to(tl.float32), axis=0) + tl.load(c_b_ptr + 2).to(tl.float32)
    if HAS_EXTRA:
        l0 += tl.load(extra_ptr + row * 3 + 0).to(tl.float32)
        l1 += tl.load(extra_ptr + row * 3 + 1).to(tl.float32)
        l2 += tl.load(extra_ptr + row * 3 + 2).to(tl.float32)
    top = tl.maximum(l0, tl.maximum(l1, l2))
    e0, e1, e2 = tl.exp(l0 - top), tl.exp(l1 - top), tl.exp(l2 - top)
    total = e0 + e1 + e2
    tl.store(probs_ptr + row * 3 + 0, e0 / total)
    tl.store(probs_ptr + row * 3 + 1, e1 / total)
    tl.store(probs_ptr + row * 3 + 2, e2 / total)


def layer_check_triton(x, delta, ln_weight, ln_bias, cls_weight, cls_bias, extra_bias=None, eps: float = 1e-5, num_warps: int = 4):
    assert x.shape == delta.shape and x.dim() == 2 and cls_weight.shape == (N_ACTIONS, x.shape[1])
    x, delta = x.contiguous(), delta.to(x.dtype).contiguous()
    B, d = x.shape
    h = torch.empty_like(x)
    probs = torch.empty((B, N_ACTIONS), dtype=torch.float32, device=x.device)
    extra = extra_bias.float().contiguous() if extra_bias is not None else probs  # any pointer; never read
    _layer_check_kernel[(B,)](
        x, delta, h, ln_weight.contiguous(), ln_bias.contiguous(), cls_weight.contiguous(), cls_bias.contiguous(),
        extra, probs, d, x.stride(0), delta.stride(0), h.stride(0), eps,
        HAS_EXTRA=extra_bias is not None, BLOCK_D=triton.next_power_of_2(d), num_warps=num_warps,
    )
    return h, probs
