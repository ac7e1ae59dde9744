"""Where one decoded token's time goes, and whether torch.compile (CPU inductor) of the decode step pays.

    python experiments/decode_profile.py [--model DIR] [--tokens 60] [--threads 2]

On one test-split prompt, after prefill: the median ms per full-depth decode step for our
eager step, the same step under `torch.compile(dynamic=True)` (compile time reported
apart), the same step over the weight-only int8 copy, generic and lean (earlyexit.runtime.lean_step:
full mode's path with `--weights int8`, and lossless mode's greedy draft), and the
early-exit step, fp32 and int8, at the heads' exit threshold and asked layers with stopping
off; each in alternation, after warm-up. Then a torch.profiler trace of 20 steps of each
of eager, lean full depth and early exit (fp32 and int8), side by side by operator (self CPU
time per token): where an early-exit token saves and where its checks and copies cost. On the
native step a token is one aten op, so the step's own phase timer (csrc/phases.h) shows the
same for it, phase by phase: block projections, attention, checks, exit head, state copy,
final head. Writes experiments/results/decode_profile/.
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it takes a minute to compile)")
    return p.parse_args(argv)


def full_depth_variants(model, int8) -> dict:
    """The full-depth decode steps: eager, fp32 lean, int8 generic and int8 lean; each step(token, cache, pos, prev)
    -> (logits, layers)."""
    L = model.dims.n_layer

    @torch.no_grad()
    def eager(token, cache, pos, prev):
        return model.logits(model.hidden(token, cache, pos)[:, -1]), L

    @torch.no_grad()
    def int8_step(token, cache, pos, prev):  # GPT2.hidden: the generic path, not the lean one FullDepth takes
        return int8.logits(int8.hidden(token, cache, pos)[:, -1]), L

    variants = {"eager full-depth step": eager}
    if model.lean is not None:
        @torch.no_grad()
        def fp32_lean(token, cache, pos, prev):  # FullDepth's single-token path for an fp32 model: eager's logits bit for bit
            return model.lean.logits(int(token), cache, pos), L

        variants["fp32 lean full-depth step (full mode's path)"] = fp32_lean
    variants["int8-weight full-depth step (generic path)"] = int8_step
    if int8.lean is not None:
        def int8_lean(token, cache, pos, prev):  # full mode's path for --weights int8
            return int8.lean.logits(int(token), cache, pos), L

        def lean_greedy(token, cache, pos, prev):  # returns the greedy token's one-hot "logits": step_timer takes their argmax
            return torch.nn.functional.one_hot(torch.tensor([int8.lean.greedy(int(token), cache, pos)]), model.dims.vocab_size), L

        variants["int8-weight lean full-depth step (full mode's path, --weights int8)"] = int8_lean
        variants["int8-weight lean greedy step (lossless mode's draft)"] = lean_greedy
    return variants


def early_exit_variants(model, int8, heads) -> dict:
    """Early-exit steps at the heads' exit threshold and asked layers, stopping off, fp32 and int8 (the lean path)."""
    from earlyexit.runtime.heads import Thresholds
    from earlyexit.runtime.policies import EarlyExit

    threshold = heads.cfg.thresholds.exit
    variants = {}
    for label, m in (("fp32", model), ("int8-weight", int8)):
        policy = EarlyExit(m, heads, Thresholds(exit=threshold, stop=1.0))
        if policy.confidence is not None:  # the heads' calibrated rule, as decoding runs it by default
            rule = "exit head's confidence " + ", ".join(f">= {t:.3f} after block {k + 1}" for k, t in sorted(policy.confidence.items()))
        else:
            rule = f"controller exit {threshold:g}, asked after " + (
                "every layer" if policy.exit_layers is None else "blocks " + ",".join(str(x + 1) for x in sorted(policy.exit_layers)))

        def early(token, cache, pos, prev, policy=policy, m=m):
            r = policy.step(m, token, cache, pos, prev)
            return r.logits, r.layers

        variants[f"{label} early-exit step ({rule}, stop off)"] = early
    return variants


def time_variants(model, ids, variants: dict, args) -> list[dict]:
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
    return rows


def profile_ops(model, ids, step, tokens: int = 20) -> dict[str, dict]:
    """torch.profiler over `tokens` decode steps: per operator, self CPU ms per token and calls per token."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    step_timer(model, ids, step, tokens, around=prof)
    return {e.key: {"self_ms_per_token": e.self_cpu_time_total / tokens / 1e3, "calls_per_token": e.count / tokens}
            for e in prof.key_averages()}


def op_table(profiles: dict[str, dict], top: int = 14) -> list[str]:
    """Operators side by side: the largest `top` by time in any profile, ms per token (calls) in each."""
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, {}).get("self_ms_per_token", 0)
                                                                                 for p in profiles.values()))[:top]
    lines = ["| operator | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op in ops:
        cells = [f"{p[op]['self_ms_per_token']:.3f} ({p[op]['calls_per_token']:.0f})" if op in p else "-" for p in profiles.values()]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    totals = [f"**{sum(v['self_ms_per_token'] for v in p.values()):.2f}**" for p in profiles.values()]
    lines.append("| all operators | " + " | ".join(totals) + " |")
    return lines


def profile_native(model, ids, lean, step, tokens: int = 20) -> dict | None:
    """The native step's phase timer over `tokens` decode steps of `step` on `lean`: per phase ms and calls per token,
    and the steps' own measured ms per token beside them; None where `lean` is not native."""
    from earlyexit.runtime.native import profile_phases

    measured = []
    phases = profile_phases(lean, lambda: measured.extend(step_timer(model, ids, step, tokens)))
    if phases is None:
        return None
    return {"phases": {p["phase"]: {"ms_per_token": p["ms"] / tokens, "calls_per_token": p["calls"] / tokens} for p in phases},
            "measured_ms_per_token": sum(measured) / tokens}


def phase_table(profiles: dict[str, dict]) -> list[str]:
    """The native phases side by side: ms per token (calls per token) in each profile, their sum, the steps' own time."""
    names = list(profiles)
    phases = list(next(iter(profiles.values()))["phases"])
    lines = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for ph in phases:
        cells = [f"{p['phases'][ph]['ms_per_token']:.3f} ({p['phases'][ph]['calls_per_token']:.3g})"
                 if p["phases"][ph]["calls_per_token"] else "-" for p in profiles.values()]
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    lines.append("| all phases | " + " | ".join(f"**{sum(v['ms_per_token'] for v in p['phases'].values()):.3f}**"
                                              for p in profiles.values()) + " |")
    lines.append("| the steps' own time | " + " | ".join(f"{p['measured_ms_per_token']:.3f}" for p in profiles.values()) + " |")
    return lines


def native_profiles(model, int8, ids, variants: dict, early: dict) -> dict[str, dict]:
    """Phase timings of the native full-depth and early-exit steps, fp32 and int8 (those whose step is native)."""
    runs = [("fp32 full depth", model.lean, variants.get("fp32 lean full-depth step (full mode's path)")),
            ("int8 full depth", int8.lean, variants.get("int8-weight lean full-depth step (full mode's path, --weights int8)"))]
    runs += [(name.split(" step")[0], model.lean if name.startswith("fp32") else int8.lean, fn) for name, fn in early.items()]
    out = {name: profile_native(model, ids, lean, fn) for name, lean, fn in runs if fn is not None}
    return {name: p for name, p in out.items() if p is not None}


def after_a_pause(model, ids, step, pause_s: float = 0.04, rounds: int = 20, steps: int = 8) -> dict:
    """Median ms of each of the first `steps` decode steps after `pause_s` asleep, beside the same steps with no pause
    (each round decodes 10 steps first, so the pause is the only difference): what an editor's short completion,
    arriving after the machine sat idle, pays beside a long one."""
    cache = model.new_cache(1, ids.shape[1] + 10 + steps + 1)
    with torch.no_grad():
        token = model(ids, cache, 0)[:, -1].argmax(-1, keepdim=True)
    pos = ids.shape[1]

    def run(n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            step(token, cache, pos + i, model.dims.n_layer)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    timed = {"no pause": [], f"after {pause_s * 1e3:.0f} ms asleep": []}
    for _ in range(rounds):
        for name in timed:
            run(10)
            if name != "no pause":
                time.sleep(pause_s)
            timed[name].append(run(steps))
    return {name: np.median(np.array(v), axis=0).round(3).tolist() for name, v in timed.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.heads import heads_available, load_heads
    from earlyexit.runtime.loading import load_runtime_model, resolve_model_dir
    from earlyexit.runtime.quantize import quantize_int8

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_runtime_model(model_dir)
    room = min(200, model.dims.n_positions - max(args.tokens, 20) - 1)  # prompt + decoded tokens fit the context
    example = token_cut_examples(test_split_files(model_dir), tok, 1, target_tokens=8, max_prompt_tokens=room, seed=0)[0]
    ids = torch.tensor([tok.encode(example.prompt)[-room:]])
    int8 = quantize_int8(model)
    variants = full_depth_variants(model, int8)
    compile_seconds = None
    if not args.no_compile:
        compiled_fn = torch.compile(variants["eager full-depth step"], dynamic=True)
        t0 = time.perf_counter()
        step_timer(model, ids, compiled_fn, 3)  # compiles
        compile_seconds = time.perf_counter() - t0
        variants["torch.compile full-depth step"] = compiled_fn
    early = early_exit_variants(model, int8, load_heads(model_dir, model)) if heads_available(model_dir) else {}
    rows = time_variants(model, ids, {**variants, **early}, args)
    # one token's ops: eager full depth, and each early-exit step beside the full-depth step on the same weights
    profiled = {"eager full depth": variants["eager full-depth step"]}
    pairs = [("fp32 lean full depth", "fp32 lean full-depth step (full mode's path)"),
             ("int8 lean full depth", "int8-weight lean full-depth step (full mode's path, --weights int8)")]
    profiled |= {short: variants[name] for short, name in pairs if name in variants}
    for name, fn in early.items():
        profiled[name.split(" step")[0]] = fn
    profiles = {name: profile_ops(model, ids, fn) for name, fn in profiled.items()}
    natives = native_profiles(model, int8, ids, variants, early)
    paused = after_a_pause(model, ids, variants["fp32 lean full-depth step (full mode's path)"]) if model.lean is not None else {}
    eager_ops = profiles["eager full depth"]
    total = sum(v["self_ms_per_token"] for v in eager_ops.values())
    top = [{"op": op, **v, "share": v["self_ms_per_token"] / total}
           for op, v in sorted(eager_ops.items(), key=lambda kv: -kv[1]["self_ms_per_token"])[:12]]
    result = {"stamp": stamp(str(model_dir), vars(args)), "prompt_tokens": int(ids.shape[1]), "compile_seconds": compile_seconds,
              "rows": rows, "profile_top_ops": top, "profile_total_ms_per_token": total, "profiles": profiles,
              "native_phases": natives, "after_a_pause": paused}
    lines = [f"One test-split prompt ({ids.shape[1]} tokens), {args.tokens} greedy decode steps per round, median of {args.rounds} "
             f"alternating rounds, {args.threads} threads." + (f" torch.compile took {compile_seconds:.0f} s to compile." if compile_seconds else ""),
             "", "| decode step | median ms/token | speed vs eager |", "|---|---|---|",
             *[f"| {r['variant']} | {r['median_ms']:.2f} | {r['vs_eager']:.2f}× |" for r in rows],
             "", "Where a token's time goes, op by op (torch.profiler over 20 decode steps each, self CPU ms per token and calls "
             "per token; the profiler's own cost inflates small ops):", "", *op_table(profiles)]
    if natives:
        lines += ["", "The native steps, phase by phase (their own timer, csrc/phases.h, over 20 decode steps each: ms per token and "
                  "calls per token; what the phases leave of the steps' own time is the Python around each call):", "",
                  *phase_table(natives)]
    if paused:
        lines += ["", "The fp32 full-depth step's first decode steps after the machine sat idle, beside the same steps with no "
                  "pause (median ms of each step over 20 rounds):", "", "| | " + " | ".join(f"step {i + 1}" for i in range(8)) + " |",
                  "|---|" + "---|" * 8, *[f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for name, row in paused.items()]]
    write_results("decode_profile", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
