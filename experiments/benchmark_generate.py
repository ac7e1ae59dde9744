"""Greedy completion speed: transformers `generate` against our runtime's `full` mode, one run, same prompts.

    python experiments/benchmark_generate.py [--model DIR] [--prompts 20] [--max-new-tokens 32] [--repeats 3]

Prompts are the study's: test-split files cut at a random token. Each prompt is
completed by both engines in turn (interleaved, after warm-up) `--repeats` times.
Per-token latency is the time between consecutive generated tokens (transformers' is
read from a `StoppingCriteria` that timestamps every step); tokens/s counts prefill too.
Writes experiments/results/benchmark_generate/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, set_threads, stamp, test_split_files, write_results  # noqa: E402


class StepClock:
    """A StoppingCriteria that never stops generation, only records when each step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_hf(hf, ids: list[int], max_new: int, eos: int):
    from transformers import StoppingCriteriaList

    clock = StepClock()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                          pad_token_id=eos, stopping_criteria=StoppingCriteriaList([clock]))
    total = time.perf_counter() - t0
    return out[0, len(ids):].tolist(), total, list(np.diff(clock.times) * 1e3)


def run_ours(model, tok, ids: list[int], max_new: int):
    from earlyexit.decoding import GenerationSettings, generate

    t0 = time.perf_counter()
    c = generate(model, tok, ids, GenerationSettings(max_new_tokens=max_new))
    return c.token_ids, time.perf_counter() - t0, c.token_ms


def summarize(name: str, tokens: int, seconds: float, step_ms: list[float]) -> dict:
    return {"engine": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "median_ms_per_token": percentile(step_ms, 50), "p95_ms_per_token": percentile(step_ms, 95)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from tqdm import tqdm

    from earlyexit.data import token_cut_examples
    from earlyexit.loading import load_hf_model, load_tokenizer, resolve_model_dir
    from earlyexit.model import GPT2

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    hf, tok = load_hf_model(model_dir), load_tokenizer(model_dir)
    ours = GPT2.from_hf(hf)
    examples = token_cut_examples(test_split_files(model_dir), tok, args.prompts, target_tokens=1,
                                  max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    prompts = [tok.encode(ex.prompt) for ex in examples]
    eos = tok.eos_token_id
    for ids in prompts[:args.warmup]:
        run_hf(hf, ids, args.max_new_tokens, eos)
        run_ours(ours, tok, ids, args.max_new_tokens)
    acc = {"transformers generate": [0, 0.0, []], "earlyexit full": [0, 0.0, []]}
    identical = completions = 0
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for ids in prompts:
            ref, secs, steps = run_hf(hf, ids, args.max_new_tokens, eos)
            a = acc["transformers generate"]
            a[0] += len(ref); a[1] += secs; a[2] += steps
            got, secs, steps = run_ours(ours, tok, ids, args.max_new_tokens)
            a = acc["earlyexit full"]
            a[0] += len(got); a[1] += secs; a[2] += steps
            identical += got == ref
            completions += 1
    rows = [summarize(name, *v) for name, v in acc.items()]
    base = rows[0]
    for r in rows:
        r["speedup_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["speedup_median_ms"] = base["median_ms_per_token"] / r["median_ms_per_token"]
    result = {"stamp": stamp(str(model_dir), vars(args)), "rows": rows, "identical_completion_rate": identical / completions}
    table = [
        f"Greedy completion, {args.prompts} test-split prompts (≤ {args.max_prompt_tokens} tokens) × {args.repeats} repeats, "
        f"up to {args.max_new_tokens} new tokens, batch 1, {args.threads} threads.",
        "",
        "| engine | tokens/s | median ms/token | p95 ms/token | tokens/s vs generate | median latency vs generate |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['median_ms_per_token']:.2f} | {r['p95_ms_per_token']:.2f} | "
              f"{r['speedup_tokens_per_s']:.2f}× | {r['speedup_median_ms']:.2f}× |" for r in rows]
    table += ["", f"Completions identical token for token, ours against `generate`: {result['identical_completion_rate']:.1%}."]
    out = write_results("benchmark_generate", result, "\n".join(table))
    print("\n".join(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
