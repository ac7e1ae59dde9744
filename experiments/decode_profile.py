"""Where one decoded token's time goes, and whether torch.compile (CPU inductor) of the decode step pays.

    python experiments/decode_profile.py [--model DIR] [--tokens 60] [--threads 2]

On one test-split prompt, after prefill: the median ms per full-depth decode step for our
eager step, the same step under `torch.compile(dynamic=True)` (compile time reported
apart), the same step over the weight-only int8 copy, generic and lean (earlyexit.runtime.lean_step:
lossless mode's draft), and the
early-exit step at the heads' thresholds with stopping off (the controller's per-layer
cost); each in alternation, after warm-up. Then a torch.profiler
trace of 20 eager full-depth steps, summarised by operator (self CPU time per token).
Writes experiments/results/decode_profile/.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import set_threads, stamp, test_split_files, write_results  # noqa: E402


def step_timer(model, prompt_ids: torch.Tensor, step, tokens: int, around=None) -> list[float]:
    """ms of each of `tokens` greedy decode steps after prefill; step(token, cache, pos, prev) -> (logits, layers).

    `around`: a context manager entered after the prefill (a profiler sees only decode steps).
    """
    cache = model.new_cache(1, prompt_ids.shape[1] + tokens + 1)
    with torch.no_grad():  # not inference_mode: torch.compile cannot trace writes into inference tensors
        token = model(prompt_ids, cache, 0)[:, -1].argmax(-1, keepdim=True)
    pos, prev, times = prompt_ids.shape[1], model.dims.n_layer, []
    with around or contextlib.nullcontext():
        for i in range(tokens):
            t0 = time.perf_counter()
            logits, prev = step(token, cache, pos + i, prev)
            token = logits.argmax(-1, keepdim=True)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it takes a minute to compile)")
    args = p.parse_args(argv)
    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.heads import Thresholds, heads_available, load_heads
    from earlyexit.runtime.loading import load_runtime_model, resolve_model_dir
    from earlyexit.runtime.policies import EarlyExit
    from earlyexit.runtime.quantize import quantize_int8

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_runtime_model(model_dir)
    room = min(200, model.dims.n_positions - max(args.tokens, 20) - 1)  # prompt + decoded tokens fit the context
    example = token_cut_examples(test_split_files(model_dir), tok, 1, target_tokens=8, max_prompt_tokens=room, seed=0)[0]
    ids = torch.tensor([tok.encode(example.prompt)[-room:]])

    @torch.no_grad()
    def eager(token, cache, pos, prev):
        return model.logits(model.hidden(token, cache, pos)[:, -1]), model.dims.n_layer

    int8 = quantize_int8(model)

    @torch.no_grad()
    def int8_step(token, cache, pos, prev):  # GPT2.hidden: the generic path, not the lean one FullDepth takes
        return int8.logits(int8.hidden(token, cache, pos)[:, -1]), model.dims.n_layer

    variants = {"eager full-depth step": eager}
    if model.lean is not None:
        @torch.no_grad()
        def fp32_lean(token, cache, pos, prev):  # FullDepth's single-token path for an fp32 model: eager's logits bit for bit
            return model.lean.logits(int(token), cache, pos), model.dims.n_layer

        variants["fp32 lean full-depth step (full mode's path)"] = fp32_lean
    variants["int8-weight full-depth step (generic path)"] = int8_step
    if int8.lean is not None:
        def lean_step(token, cache, pos, prev):  # returns the greedy token's one-hot "logits": step_timer takes their argmax
            return torch.nn.functional.one_hot(torch.tensor([int8.lean.greedy(int(token), cache, pos)]), model.dims.vocab_size), model.dims.n_layer

        variants["int8-weight lean greedy step (lossless mode's draft)"] = lean_step
    compile_seconds = None
    if not args.no_compile:
        compiled_fn = torch.compile(eager, dynamic=True)
        t0 = time.perf_counter()
        step_timer(model, ids, compiled_fn, 3)  # compiles
        compile_seconds = time.perf_counter() - t0
        variants["torch.compile full-depth step"] = compiled_fn
    if heads_available(model_dir):
        heads = load_heads(model_dir, model)
        policy = EarlyExit(model, heads, Thresholds(exit=heads.cfg.thresholds.exit, stop=1.0))

        def early(token, cache, pos, prev):
            r = policy.step(model, token, cache, pos, prev)
            return r.logits, r.layers

        variants[f"early-exit step (exit {heads.cfg.thresholds.exit:g}, stop off)"] = early
    for fn in variants.values():  # warm-up
        step_timer(model, ids, fn, 5)
    medians = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            medians[name].append(float(np.median(step_timer(model, ids, fn, args.tokens))))
    rows = [{"variant": name, "median_ms": float(np.median(v)), "rounds_ms": v} for name, v in medians.items()]
    base = rows[0]["median_ms"]
    for r in rows:
        r["vs_eager"] = base / r["median_ms"]

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    step_timer(model, ids, eager, 20, around=prof)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "self_ms_per_token": e.self_cpu_time_total / 20 / 1e3, "share": e.self_cpu_time_total / total,
            "calls_per_token": e.count / 20}
           for e in ops[:12]]
    result = {"stamp": stamp(str(model_dir), vars(args)), "prompt_tokens": int(ids.shape[1]), "compile_seconds": compile_seconds,
              "rows": rows, "profile_top_ops": top, "profile_total_ms_per_token": total / 20 / 1e3}
    lines = [f"One test-split prompt ({ids.shape[1]} tokens), {args.tokens} greedy decode steps per round, median of {args.rounds} "
             f"alternating rounds, {args.threads} threads." + (f" torch.compile took {compile_seconds:.0f} s to compile." if compile_seconds else ""),
             "", "| decode step | median ms/token | speed vs eager |", "|---|---|---|",
             *[f"| {r['variant']} | {r['median_ms']:.2f} | {r['vs_eager']:.2f}× |" for r in rows],
             "", f"Where an eager full-depth token's time goes (torch.profiler, self CPU time, {result['profile_total_ms_per_token']:.2f} ms/token "
             "under the profiler):", "", "| operator | ms/token | share | calls/token |", "|---|---|---|---|",
             *[f"| `{t['op']}` | {t['self_ms_per_token']:.3f} | {t['share']:.1%} | {t['calls_per_token']:.0f} |" for t in top]]
    write_results("decode_profile", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
