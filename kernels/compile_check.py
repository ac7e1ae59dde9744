"""Compile every kernel for real GPU targets without a GPU: `python -m earlyexit.kernels.compile_check`.

Triton's interpreter runs kernels as NumPy and lets through what the GPU compiler
refuses (unsupported casts, tensor shapes, layout conversions). Compiling each kernel to
PTX and cubin for sm_80 (A100) and sm_90 (H100) catches those on a machine with no GPU.
Must run with TRITON_INTERPRET unset (the tests run it in a subprocess).
"""

from __future__ import annotations

import json
import os
import sys


def kernel_specs(dtype: str):
    """(name, jit function, signature, constexprs) for each kernel, at one input dtype ('fp32' or 'fp16')."""
    from .exit_confidence import _exit_confidence_merge_kernel, _exit_confidence_split_kernel
    from .layer_check import _layer_check_kernel
    from .state_copy import _state_copy_kernel

    p, f32p = f"*{dtype}", "*fp32"
    split = {"h_ptr": p, "ln_w_ptr": f32p, "ln_b_ptr": f32p, "w_ptr": p, "part_ptr": f32p, "d": "i32", "V": "i32",
             "split_size": "i32", "n_splits": "i32", "stride_h": "i32", "stride_w": "i32", "eps": "fp32",
             "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "NORMALIZE": "constexpr"}
    return [
        ("exit_confidence_split", _exit_confidence_split_kernel, split, {"BLOCK_V": 128, "BLOCK_D": 64, "NORMALIZE": True}),
        ("exit_confidence_split_normalised", _exit_confidence_split_kernel,  # the exit heads' own LN + adapter ran
         {**split, "ln_w_ptr": p, "ln_b_ptr": p},  # unread: the launcher passes h itself for them
         {"BLOCK_V": 128, "BLOCK_D": 64, "NORMALIZE": False}),
        ("exit_confidence_merge", _exit_confidence_merge_kernel,
         {"part_ptr": f32p, "token_ptr": "*i64", "stats_ptr": f32p, "n_splits": "i32", "BLOCK_S": "constexpr"},
         {"BLOCK_S": 512}),
        ("layer_check", _layer_check_kernel,
         {"x_ptr": p, "delta_ptr": p, "h_ptr": p, "ln_w_ptr": f32p, "ln_b_ptr": f32p, "c_w_ptr": f32p, "c_b_ptr": f32p,
          "extra_ptr": f32p, "probs_ptr": f32p, "d": "i32", "stride_x": "i32", "stride_delta": "i32", "stride_h": "i32",
          "eps": "fp32", "HAS_EXTRA": "constexpr", "BLOCK_D": "constexpr"},
         {"HAS_EXTRA": True, "BLOCK_D": 1024}),
        ("state_copy", _state_copy_kernel,
         {"h_ptr": p, "ln_w_ptr": f32p, "ln_b_ptr": f32p, "w_ptr": f32p, "b_ptr": f32p, "k_ptr": p, "v_ptr": p,
          "first_layer": "i32", "pos": "i32", "d": "i32", "hs": "i32", "stride_h": "i32",
          **{f"sk_{s}": "i32" for s in "lbhse"}, **{f"sv_{s}": "i32" for s in "lbhse"}, "eps": "fp32",
          "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
         {"BLOCK_N": 64, "BLOCK_D": 64}),
    ]


def compile_all(capabilities=(80, 90), dtypes=("fp32", "fp16")) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = []
    for cap in capabilities:
        for dtype in dtypes:
            for name, fn, signature, constexprs in kernel_specs(dtype):
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", cap, 32))
                report.append({"kernel": name, "sm": cap, "dtype": dtype, "ptx_bytes": len(compiled.asm["ptx"]),
                               "cubin_bytes": len(compiled.asm.get("cubin", b"")),
                               "shared_mem_bytes": compiled.metadata.shared})
    return report


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    print(json.dumps(compile_all(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
