"""Fused exit-check kernels against the unfused PyTorch sequences, on a CUDA device.

    python experiments/benchmark_kernels.py            # on a machine with a GPU
    python experiments/benchmark_kernels.py --interpret  # no GPU: small shapes through Triton's interpreter

On CUDA every kernel is timed with `triton.testing.do_bench` (median) against its
PyTorch reference (the unfused sequence), at GPT-2 small's sizes (d 768, V 50,257) and the
default model's (d 256, V 8,192), for B in {1, 8, 64}. The exit-confidence kernel's
bytes moved (W once, plus h) over its time is reported against the device's measured
copy bandwidth. Results go to experiments/results/benchmark_kernels/.

With --interpret (no GPU) the same code paths run on CPU tensors through the
interpreter at small shapes and check the outputs against the references; timings
there mean nothing, so nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interpret", action="store_true", help="no GPU: run small shapes through Triton's interpreter")
    p.add_argument("--batches", default="1,8,64")
    return p.parse_args(argv)


def end_to_end(device: str, prompts: int, max_new_tokens: int) -> dict:
    """Early-exit decoding of the embedded model with its heads, through the Triton kernels and through the references."""
    import numpy as np

    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import DEFAULT_MODEL_DIR, load_runtime_model
    from earlyexit.runtime.policies import EarlyExit

    model, tok = load_runtime_model()
    model = model.to(device)
    heads = load_heads(DEFAULT_MODEL_DIR, model).to(device)
    texts = ["def read_json(path):\n", "import os\n\n\ndef list_files(directory):\n", "class Stack:\n    def push(self, item):\n",
             "for i, line in enumerate(lines):\n", "try:\n    import numpy as np\nexcept ImportError:\n", "def __repr__(self):\n",
             "with open(path) as f:\n", "if __name__ == '__main__':\n"][:prompts]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    out = {}
    for backend in ("torch", "triton"):
        policy = EarlyExit(model, heads, kernel_backend=backend, exit_rule="controller")  # the layer-check kernel decides
        runs = [complete(model, tok, t, settings, policy=policy) for t in texts]
        out[backend] = runs
    ms = {b: float(np.median([m for c in runs for m in c.token_ms] or [float("nan")])) for b, runs in out.items()}
    identical = np.mean([a.token_ids == b.token_ids for a, b in zip(out["torch"], out["triton"])])
    return {"torch_ms": ms["torch"], "triton_ms": ms["triton"], "identical": float(identical),
            "tokens": sum(len(c.token_ids) for c in out["torch"])}


def timer(cuda: bool, device: str):
    """(bench, copy bandwidth in GB/s, shapes): `triton.testing.do_bench` at full sizes on CUDA; in the interpreter
    one untimed call and one timed, at a small shape, and no bandwidth."""
    import torch

    if cuda:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

        copy_src = torch.empty(256 * 2**20 // 4, device=device)
        copy_dst = torch.empty_like(copy_src)
        copy_ms = bench(lambda: copy_dst.copy_(copy_src))
        bandwidth = 2 * copy_src.numel() * 4 / (copy_ms * 1e-3) / 1e9  # read + write, GB/s
        return bench, bandwidth, [("GPT-2 small", 768, 50257, 12), ("default model", 256, 8192, 12)]

    def bench(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return bench, float("nan"), [("interpreter", 40, 1000, 4)]


def time_kernels(K, bench, device: str, shape: tuple, dtype, B: int, bandwidth: float) -> list[dict]:
    """One row per kernel of `K` (earlyexit.kernels.dispatch) at one shape, dtype and batch: fused (Triton) against its
    PyTorch reference."""
    import torch

    label, d, V, L = shape
    h = torch.randn(B, d, device=device, dtype=dtype)
    W = (torch.randn(V, d, device=device) * 0.05).to(dtype)
    ln_w, ln_b = torch.rand(d, device=device) + 0.5, torch.randn(d, device=device) * 0.1
    fused = K.exit_confidence(h, ln_w, ln_b, W, backend="triton")
    ref = K.exit_confidence_reference(h, ln_w, ln_b, W)
    assert torch.equal(fused.token, ref.token), "exit_confidence: argmax differs from the reference"
    t_fused = bench(lambda: K.exit_confidence(h, ln_w, ln_b, W, backend="triton"))
    t_ref = bench(lambda: K.exit_confidence_reference(h, ln_w, ln_b, W))
    moved = W.numel() * W.element_size() + h.numel() * h.element_size()
    gbs = moved / (t_fused * 1e-3) / 1e9
    where = {"shape": label, "d": d, "V": V, "B": B, "dtype": str(dtype).split(".")[-1]}
    rows = [{"kernel": "exit_confidence", **where, "fused_ms": t_fused, "unfused_ms": t_ref, "speedup": t_ref / t_fused, "GB_s": gbs,
             "bandwidth_fraction": gbs / bandwidth}]

    x, delta = torch.randn(B, d, device=device, dtype=dtype), torch.randn(B, d, device=device, dtype=dtype)
    C, cb = torch.randn(3, d, device=device), torch.randn(3, device=device)
    t_fused = bench(lambda: K.layer_check(x, delta, ln_w, ln_b, C, cb, backend="triton"))
    t_ref = bench(lambda: K.layer_check_reference(x, delta, ln_w, ln_b, C, cb))
    rows.append({"kernel": "layer_check", **where, "fused_ms": t_fused, "unfused_ms": t_ref, "speedup": t_ref / t_fused})

    nh = d // 64 if d % 64 == 0 else 5
    w = K.StateCopyWeights(torch.rand(L, d, device=device), torch.randn(L, d, device=device),
                           torch.randn(L, 2 * d, d, device=device) * 0.02, torch.randn(L, 2 * d, device=device), 1e-5)
    kc, vc = (torch.zeros(L, B, nh, 64, d // nh, device=device, dtype=dtype) for _ in range(2))
    skipped = L - 2
    t_fused = bench(lambda: K.state_copy(h, w, kc, vc, 2, skipped, 5, backend="triton"))
    t_ref = bench(lambda: K.state_copy_reference(h, w, kc, vc, 2, skipped, 5))
    rows.append({"kernel": f"state_copy ({skipped} layers)", **where, "fused_ms": t_fused, "unfused_ms": t_ref, "speedup": t_ref / t_fused})
    return rows


def render(rows: list[dict], e2e: dict, device: str, cuda: bool) -> str:
    """The kernel table (bandwidth only on CUDA) and the end-to-end table."""
    table = ["| kernel | shape | dtype | B | fused ms | unfused ms | speedup | GB/s (of copy bandwidth) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = f"{r['GB_s']:.0f} ({r['bandwidth_fraction']:.0%})" if "GB_s" in r and cuda else "-"
        table.append(f"| {r['kernel']} | {r['shape']} (d {r['d']}, V {r['V']}) | {r['dtype']} | {r['B']} | {r['fused_ms']:.4f} | "
                     f"{r['unfused_ms']:.4f} | {r['speedup']:.2f}× | {bw} |")
    table += ["", f"End to end, early-exit decoding of the embedded model on {device} ({e2e['tokens']} tokens per backend):", "",
              "| kernels | ms/token (median) | identical tokens |", "|---|---|---|",
              f"| PyTorch references | {e2e['torch_ms']:.3f} | - |",
              f"| Triton | {e2e['triton_ms']:.3f} | {e2e['identical']:.0%} |"]
    return "\n".join(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, below
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import earlyexit.kernels.dispatch as K
    from common import stamp, write_results

    cuda = torch.cuda.is_available() and not args.interpret
    if not cuda and not args.interpret:
        print("no CUDA device: nothing to time. Run with --interpret to check the kernels in Triton's interpreter.")
        return 0
    device = "cuda" if cuda else "cpu"
    bench, bandwidth, shapes = timer(cuda, device)
    batches = [int(b) for b in args.batches.split(",")] if cuda else [1, 3]
    rows = [row for shape in shapes for dtype in (torch.float16, torch.float32) for B in batches
            for row in time_kernels(K, bench, device, shape, dtype, B, bandwidth)]
    e2e = end_to_end(device, prompts=8 if cuda else 1, max_new_tokens=32 if cuda else 4)
    table = render(rows, e2e, device, cuda)
    print(table)
    if cuda:
        result = {"stamp": {**stamp("synthetic weights; end to end: the embedded model", vars(args)), "gpu": torch.cuda.get_device_name()},
                  "copy_bandwidth_GB_s": bandwidth, "rows": rows, "end_to_end": e2e}
        out = write_results("benchmark_kernels", result, f"GPU: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.0f} GB/s\n\n" + table)
        print(f"wrote {out}")
    else:
        print("interpreter run: outputs checked against the references; the timings above are not GPU timings and are not saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
