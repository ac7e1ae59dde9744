"""Greedy completion speed: transformers `generate` against our runtime's modes, one run, same prompts.

    python experiments/benchmark_generate.py [--model DIR] [--prompts 20] [--max-new-tokens 32] [--repeats 3]

Prompts are the study's: test-split files cut at a random token. Every prompt is completed
by every engine in turn (interleaved, after warm-up) `--repeats` times: transformers'
`generate`, our `full` loop and, when the model has exit heads, `early-exit` (heads'
calibrated thresholds) and `lossless`, twice: with its default drafts (a weight-only int8
copy of the model, earlyexit.runtime.quantize) and drafting with the fp32 model's own exits; and
`full` and `early-exit` over the int8 copy (`--weights int8`), whose tokens may differ. Per-token latency is the time between consecutive
generated tokens (transformers' is read from a `StoppingCriteria` that timestamps every
step; lossless spreads a round's time over the tokens it wrote); tokens/s counts prefill
too. Quality columns compare each engine's tokens with `full` greedy and its text with the
reference continuation (ROUGE-L). Writes experiments/results/benchmark_generate/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PeerUnavailable, ggml_engine, ort_engine  # noqa: E402
from common import DATA_HELP, our_engine, percentile, set_threads, stamp, test_split_files, write_results  # noqa: E402


class StepClock:
    """A StoppingCriteria that never stops generation, only records when each step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_engine(hf, eos: int):
    from transformers import StoppingCriteriaList

    def run(ids: list[int], max_new: int):
        clock = StepClock()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                              pad_token_id=eos, stopping_criteria=StoppingCriteriaList([clock]))
        total = time.perf_counter() - t0
        return out[0, len(ids):].tolist(), total, list(np.diff(clock.times) * 1e3), None

    return run


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    names = [r["engine"] for r in rows][::-1]
    med = [r["median_ms_per_token"] for r in rows][::-1]
    p95 = [r["p95_ms_per_token"] for r in rows][::-1]
    ax.barh(names, p95, color="lightgray", label="p95")
    ax.barh(names, med, color="tab:blue", label="median")
    for y, (m, r) in enumerate(zip(med, rows[::-1])):
        ax.text(m, y, f" {m:.2f} ms ({r['speedup_median_ms']:.2f}× generate)", va="center", fontsize=8)
    ax.set_xlabel("ms per generated token (batch 1)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Greedy decoding speed, same prompts, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class EngineParts:
    """What the engines are built from, loaded on first use: a memory probe builds only its engine's parts."""

    def __init__(self, model_dir: Path, tok, args):
        from earlyexit.runtime.heads import heads_available

        self.model_dir, self.tok, self.args = model_dir, tok, args
        self.has_heads = heads_available(model_dir)
        self.work = Path(tempfile.mkdtemp(prefix="earlyexit-peers-"))

    @cached_property
    def hf(self):
        from earlyexit.runtime.loading import load_hf_model

        return load_hf_model(self.model_dir)

    @cached_property
    def ours(self):
        from earlyexit.runtime.loading import load_runtime_model

        return load_runtime_model(self.model_dir)[0]

    @cached_property
    def heads(self):
        from earlyexit.runtime.heads import load_heads

        return load_heads(self.model_dir, self.ours)

    @cached_property
    def int8(self):
        from earlyexit.runtime.quantize import quantize_int8

        return quantize_int8(self.ours)

    def factories(self) -> dict:
        """Engine name -> a function building its runner (a peer's raises PeerUnavailable saying why), in table order."""
        from earlyexit.runtime.policies import EarlyExit, FullDepth
        from earlyexit.runtime.speculative import Lossless

        a, tok = self.args, self.tok

        def skipped():
            raise PeerUnavailable("skipped (--no-peers)")

        f = {"transformers generate": lambda: hf_engine(self.hf, tok.eos_token_id),
             "onnxruntime": skipped if a.no_peers else lambda: ort_engine(self.ours, tok.eos_token_id, self.work, a.threads),
             "ggml (ctransformers)": skipped if a.no_peers else lambda: ggml_engine(self.ours, tok, self.work, a.threads),
             "earlyexit full": lambda: our_engine(self.ours, tok, FullDepth())}
        if self.has_heads:
            f |= {
                "earlyexit early-exit": lambda: our_engine(self.ours, tok, EarlyExit(self.ours, self.heads)),
                "earlyexit lossless": lambda: our_engine(self.ours, tok, Lossless(self.ours, self.heads, max_draft=a.max_draft)),  # int8 drafts
                "earlyexit lossless (fp32 exit drafts)": lambda: our_engine(
                    self.ours, tok, Lossless(self.ours, self.heads, max_draft=a.max_draft, draft="same")),
                # with the heads' stop threshold, as early-exit mode has it: full's tokens up to where the controller stops
                "earlyexit lossless (stopping)": lambda: our_engine(
                    self.ours, tok, Lossless(self.ours, self.heads, max_draft=a.max_draft, stop_threshold=self.heads.cfg.thresholds.stop)),
                # --weights int8 on the command line: faster, not fp32's tokens
                "earlyexit full (int8 weights)": lambda: our_engine(self.int8, tok, FullDepth()),
                "earlyexit early-exit (int8 weights)": lambda: our_engine(self.int8, tok, EarlyExit(self.int8, self.heads)),
            }
        return f


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def probe_memory(parts: EngineParts, name: str) -> dict[str, float]:
    """The memory engine `name` adds to this process: building it and completing one prompt.

    The process's peak RSS (VmHWM) is reset after the shared set-up (Python, torch,
    transformers, the tokenizer: the import peak every engine shares and that hid the
    engines' own cost), then read again once the engine has run; "baseline" builds nothing.
    Returns the peak over the RSS at the reset (`added_mb`) and that peak itself (`peak_rss_mb`).
    """
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    before = _proc_status_mb("VmRSS")
    if name != "baseline":
        run = parts.factories()[name]()
        prompt = parts.tok.encode("import os\n\n\ndef read_config(path):\n    ")
        run(prompt, parts.args.max_new_tokens)
    peak = _proc_status_mb("VmHWM")
    return {"added_mb": peak - before, "peak_rss_mb": peak}


def measure_memory(args, names: list[str]) -> dict[str, float | None]:
    """`probe_memory` of each engine in a fresh process (peaks do not mix), plus the baseline: engine -> MB added."""
    import json as _json
    import subprocess

    out = {}
    for name in ["baseline", *names]:
        cmd = [sys.executable, __file__, "--memory-of", name, "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens)]
        cmd += ["--model", args.model] if args.model else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        out[name] = _json.loads(lines[-1])["added_mb"] if done.returncode == 0 and lines else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-draft", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime and GGML (reported as skipped)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process per engine)")
    p.add_argument("--memory-of", metavar="ENGINE", help=argparse.SUPPRESS)  # the probe run in a subprocess
    args = p.parse_args(argv)
    from tqdm import tqdm

    from earlyexit.data.corpus import token_cut_examples
    from earlyexit.runtime.loading import load_tokenizer, resolve_model_dir
    from earlyexit.evaluation.metrics import rouge_l

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    parts = EngineParts(model_dir, tok, args)
    if args.memory_of:
        print(json.dumps(probe_memory(parts, args.memory_of)))
        return 0
    ours = parts.ours
    engines, unavailable = {}, {}
    for name, make in parts.factories().items():
        try:
            engines[name] = make()
        except PeerUnavailable as e:
            unavailable[name] = str(e)
    thresholds = parts.heads.cfg.thresholds if parts.has_heads else None
    examples = token_cut_examples(test_split_files(model_dir, args.data), tok, args.prompts, target_tokens=args.max_new_tokens,
                                  max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    prompts = [tok.encode(ex.prompt) for ex in examples]
    for ids in prompts[:args.warmup]:
        for run in engines.values():
            run(ids, args.max_new_tokens)
    acc = {name: {"tokens": 0, "seconds": 0.0, "step_ms": [], "identical": 0, "rouge": [], "rouge_vs_full": [], "layers": [], "drafted": 0, "accepted": 0}
           for name in engines}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for ex, ids in zip(examples, prompts):
            reference = None
            for name, run in engines.items():
                tokens, secs, steps, completion = run(ids, args.max_new_tokens)
                if name == "earlyexit full":
                    reference = tokens
                a = acc[name]
                a["tokens"] += len(tokens)
                a["seconds"] += secs
                a["step_ms"] += steps
                a["tokens_list"] = a.get("tokens_list", []) + [tokens]
                a["rouge"].append(rouge_l(tok.decode(tokens, skip_special_tokens=True), ex.target))
                if completion is not None:
                    a["layers"] += completion.exit_layers
                    a["drafted"] += completion.speculation.get("drafted", 0)
                    a["accepted"] += completion.speculation.get("accepted", 0)
            full_text = tok.decode(reference, skip_special_tokens=True)
            for name in engines:
                written = acc[name]["tokens_list"][-1]
                acc[name]["identical"] += written == reference
                acc[name]["rouge_vs_full"].append(rouge_l(tok.decode(written, skip_special_tokens=True), full_text) if full_text else float(not written))
    rows = []
    n_runs = args.repeats * len(prompts)
    for name, a in acc.items():
        rows.append({
            "engine": name, "tokens": a["tokens"], "seconds": a["seconds"], "tokens_per_s": a["tokens"] / a["seconds"],
            "median_ms_per_token": percentile(a["step_ms"], 50), "p95_ms_per_token": percentile(a["step_ms"], 95),
            "identical_to_full": a["identical"] / n_runs, "rouge_l": float(np.mean(a["rouge"])),
            "rouge_l_vs_full": float(np.mean(a["rouge_vs_full"])),
            "mean_layers": float(np.mean(a["layers"])) if a["layers"] else float(ours.dims.n_layer),
            "acceptance_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
        })
    memory = {} if args.no_memory else measure_memory(args, [r["engine"] for r in rows])
    for r in rows:
        r["memory_added_mb"] = memory.get(r["engine"])
    base = rows[0]
    for r in rows:
        r["speedup_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["speedup_median_ms"] = base["median_ms_per_token"] / r["median_ms_per_token"]
    result = {"stamp": stamp(str(model_dir), vars(args)), "thresholds": thresholds and vars(thresholds), "rows": rows,
              "unavailable": unavailable, "baseline_added_mb": memory.get("baseline")}
    L = ours.dims.n_layer
    table = [
        f"Greedy completion of {args.prompts} test-split prompts (≤ {args.max_prompt_tokens} tokens) × {args.repeats} repeats, "
        f"up to {args.max_new_tokens} new tokens, batch 1, {args.threads} threads; reference for ROUGE-L: the file's next "
        f"{args.max_new_tokens} tokens." + (f" Early-exit thresholds: exit {thresholds.exit}, stop {thresholds.stop}." if thresholds else "")
        + (" Memory: the peak RSS an engine adds to a process that has already imported torch, transformers and the "
           "tokenizer, building the engine (weights included) and completing one prompt, one process per engine "
           f"(building nothing adds {memory['baseline']:.0f} MB)." if memory.get("baseline") is not None else ""),
        "",
        "| engine | tokens/s | median ms/token | p95 ms/token | tokens/s vs generate | ms/token vs generate | identical to full | "
        f"ROUGE-L vs reference | ROUGE-L vs full | mean layers (of {L}) | drafts accepted | memory added MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accepted = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
        rss = f"{r['memory_added_mb']:.0f}" if r["memory_added_mb"] is not None else "-"
        table.append(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['median_ms_per_token']:.2f} | {r['p95_ms_per_token']:.2f} | "
                     f"{r['speedup_tokens_per_s']:.2f}× | {r['speedup_median_ms']:.2f}× | {r['identical_to_full']:.0%} | {r['rouge_l']:.3f} | "
                     f"{r['rouge_l_vs_full']:.3f} | {r['mean_layers']:.2f} | {accepted} | {rss} |")
    for name, why in unavailable.items():
        table.append(f"| {name} | not run: {why} | | | | | | | | | | |")
    table += ["", "![median ms per token by engine](ms_per_token.png)"]
    out = write_results("benchmark_generate", result, "\n".join(table))
    plot(rows, out / "ms_per_token.png")
    print("\n".join(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
