"""Layer-norm statistics of one row, shared by the kernels that normalise a hidden state chunk by chunk."""

import triton
import triton.language as tl


@triton.jit
def row_mean_rstd(
    row_ptr,  # start of one row of d values, fp32 or fp16
    d, eps,
    BLOCK_D: tl.constexpr,  # features per chunk
):
    """(mean, 1 / sqrt(var + eps)) of the row in float32, in one pass over it."""
    acc_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(row_ptr + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
        acc_sum += x
        acc_sq += x * x
    mean = tl.sum(acc_sum, axis=0) / d
    var = tl.maximum(tl.sum(acc_sq, axis=0) / d - mean * mean, 0.0)
    return mean, 1.0 / tl.sqrt(var + eps)
