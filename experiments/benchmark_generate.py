"""Greedy completion speed: transformers `generate`, the peer engines and our runtime's modes, one run, same prompts.

    python experiments/benchmark_generate.py [--model DIR] [--prompts 20 | --prompts FILE.jsonl] [--task tokens|line]
                                             [--max-new-tokens 32] [--repeats 3]

Prompts: the study's (test-split files cut at a random token, `--task tokens`), editor-style
lines (`--task line`: cut inside a line's code, the target the rest of that line, every
engine stops at the end of the line) or a JSONL file (one object a line: `prompt`, optional
`target`). Every prompt is completed by every engine in turn (interleaved, after warm-up)
`--repeats` times: transformers' `generate`; the peers a CPU user would pick on the same
weights (llama.cpp through llama-cpp-python on our GGUF export, fp32 and Q8_0; ONNX Runtime;
ctransformers' GGML runner); our `full` loop and, when the model has exit heads,
`early-exit` (the heads' calibrated thresholds and asked layers) and `lossless` (int8
drafts; drafting with the fp32 model's own exits; with the heads' stop threshold); `full`
and `early-exit` over the int8 copy (`--weights int8`), whose tokens may differ. Per-token
latency is the time between consecutive generated tokens (transformers' is read from a
`StoppingCriteria` that timestamps every step; lossless spreads a round's time over the
tokens it wrote); tokens/s counts prefill too. Quality columns compare each engine's text
with `full`'s and with the reference (ROUGE-L; on the line task exact match and edit
similarity of the line). Writes experiments/results/benchmark_generate/ (`--task line`:
benchmark_generate_line/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PeerUnavailable, ggml_engine, llama_cpp_engine, ort_engine  # noqa: E402
from common import DATA_HELP, our_engine, set_threads, stamp, test_split_files, write_results  # noqa: E402
from benchmark_report import plot, render, summarize  # noqa: E402


class StepClock:
    """A StoppingCriteria that records when each step ends, and stops a row after a token in `stop_ids`."""

    def __init__(self, stop_ids: frozenset[int] = frozenset()):
        self.times: list[float] = []
        self.stop_ids = stop_ids

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.tensor([int(row[-1]) in self.stop_ids for row in input_ids], dtype=torch.bool)


def hf_engine(hf, eos: int, stop_ids: frozenset[int]):
    from transformers import StoppingCriteriaList

    def run(ids: list[int], max_new: int):
        clock = StepClock(stop_ids)
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                              pad_token_id=eos, stopping_criteria=StoppingCriteriaList([clock]))
        total = time.perf_counter() - t0
        return out[0, len(ids):].tolist(), total, list(np.diff(clock.times) * 1e3), None

    return run


def newline_tokens(tok) -> frozenset[int]:
    """The token ids whose text holds a line break: where a peer ends a line completion."""
    return frozenset(i for i in range(len(tok)) if "\n" in tok.decode([i]))


def load_examples(args, tok, model_dir: Path) -> list:
    """(prompt, target) examples: --prompts FILE.jsonl, else --prompts N cut from the test split for the task."""
    from earlyexit.data.corpus import CompletionExample, line_cut_examples, token_cut_examples
    from earlyexit.errors import EarlyExitError

    if not args.prompts.isdigit():
        path = Path(args.prompts)
        if not path.is_file():
            raise EarlyExitError(f"--prompts: no file {path} (give a number of test-split prompts or a JSONL file)")
        examples = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EarlyExitError(f"{path}:{n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise EarlyExitError(f"{path}:{n} needs a non-empty string field \"prompt\"")
            if not isinstance(row.get("target", ""), str):
                raise EarlyExitError(f"{path}:{n}: \"target\" must be a string")
            examples.append(CompletionExample(str(path), row["prompt"], row.get("target", "")))
        if not examples:
            raise EarlyExitError(f"{path} holds no prompts")
        return examples
    files = test_split_files(model_dir, args.data)
    if args.task == "line":
        return line_cut_examples(files, int(args.prompts), max_prompt_chars=4 * args.max_prompt_tokens, seed=args.seed)
    return token_cut_examples(files, tok, int(args.prompts), target_tokens=args.max_new_tokens,
                              max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)


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

        stop_ids = newline_tokens(tok) if a.task == "line" else frozenset()
        stops = ("\n",) if a.task == "line" else ()

        def peer(make):  # a peer decoding one token at a time ends a line completion after its line break
            return skipped if a.no_peers else lambda: partial(make(), stop_ids=stop_ids)

        def ours(weights: str, policy):  # built on first use: a memory probe of one engine loads only its parts
            return lambda: our_engine(getattr(self, weights), tok, policy(), stops)

        f = {"transformers generate": lambda: hf_engine(self.hf, tok.eos_token_id, stop_ids),
             "llama.cpp fp32": peer(lambda: llama_cpp_engine(self.ours, tok, self.work, a.threads, "f32")),
             "llama.cpp Q8_0": peer(lambda: llama_cpp_engine(self.ours, tok, self.work, a.threads, "q8_0")),
             "onnxruntime": peer(lambda: ort_engine(self.ours, tok.eos_token_id, self.work, a.threads)),
             "ggml (ctransformers)": peer(lambda: ggml_engine(self.ours, tok, self.work, a.threads)),
             "earlyexit full": ours("ours", FullDepth)}
        if self.has_heads:
            f |= {
                "earlyexit early-exit": ours("ours", lambda: EarlyExit(self.ours, self.heads)),
                "earlyexit lossless": ours("ours", lambda: Lossless(self.ours, self.heads, max_draft=a.max_draft)),  # int8 drafts
                "earlyexit lossless (fp32 exit drafts)": ours("ours", lambda: Lossless(self.ours, self.heads, max_draft=a.max_draft, draft="same")),
                # with the heads' stop threshold, as early-exit mode has it: full's tokens up to where the controller stops
                "earlyexit lossless (stopping)": ours(
                    "ours", lambda: Lossless(self.ours, self.heads, max_draft=a.max_draft, stop_threshold=self.heads.cfg.thresholds.stop)),
                # --weights int8 on the command line: faster, not fp32's tokens
                "earlyexit full (int8 weights)": ours("int8", FullDepth),
                "earlyexit early-exit (int8 weights)": ours("int8", lambda: EarlyExit(self.int8, self.heads)),
            }
            for E in a.draft_layers:  # LayerSkip's self-speculation: drafts from blocks 0..E-1, verified from block E on
                f[f"earlyexit lossless (drafts from {E} layers)"] = ours(
                    "ours", lambda E=E: Lossless(self.ours, self.heads, max_draft=a.max_draft, draft_layers=E))
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
        cmd += ["--draft-layers", *map(str, args.draft_layers)] if args.draft_layers else []  # their rows' names
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        out[name] = _json.loads(lines[-1])["added_mb"] if done.returncode == 0 and lines else None
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--prompts", default="20", help="how many test-split prompts, or a JSONL file of {\"prompt\", \"target\"} objects")
    p.add_argument("--task", choices=("tokens", "line"), default="tokens",
                   help="tokens: the study's, up to --max-new-tokens; line: complete the rest of a line, stopping at its end")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-draft", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-layers", type=int, nargs="*", default=[], metavar="E",
                   help="add a lossless row drafting with the first E blocks and exit head E-1 (LayerSkip), for each E")
    p.add_argument("--out", help="results folder name under experiments/results (default: benchmark_generate[_line])")
    p.add_argument("--no-peers", action="store_true", help="skip llama.cpp, ONNX Runtime and GGML (reported as skipped)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process per engine)")
    p.add_argument("--memory-of", metavar="ENGINE", help=argparse.SUPPRESS)  # the probe run in a subprocess
    return p.parse_args(argv)


def line_of(text: str) -> str:
    """A line completion's text: up to its first line break."""
    return text.split("\n", 1)[0]


def measure(engines: dict, examples: list, prompts: list[list[int]], args, tok) -> dict:
    """Every engine on every prompt, interleaved, `args.repeats` times: per engine the raw counts and texts."""
    from tqdm import tqdm

    from earlyexit.evaluation.metrics import edit_similarity, rouge_l

    for ids in prompts[:args.warmup]:
        for run in engines.values():
            run(ids, args.max_new_tokens)
    acc = {name: {"tokens": 0, "seconds": 0.0, "step_ms": [], "identical": 0, "rouge": [], "rouge_vs_full": [], "layers": [],
                  "drafted": 0, "accepted": 0, "em": [], "es": []} for name in engines}
    line = args.task == "line"
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for ex, ids in zip(examples, prompts):
            texts = {}
            for name, run in engines.items():
                tokens, secs, steps, completion = run(ids, args.max_new_tokens)
                a = acc[name]
                a["tokens"] += len(tokens)
                a["seconds"] += secs
                a["step_ms"] += steps
                text = tok.decode(tokens, skip_special_tokens=True)
                texts[name] = line_of(text) if line else text
                a["rouge"].append(rouge_l(texts[name], ex.target))
                if line:
                    a["em"].append(float(texts[name].strip() == ex.target.strip()))
                    a["es"].append(edit_similarity(texts[name].strip(), ex.target.strip()))
                if completion is not None:
                    a["layers"] += completion.exit_layers
                    a["drafted"] += completion.speculation.get("drafted", 0)
                    a["accepted"] += completion.speculation.get("accepted", 0)
            full = texts["earlyexit full"]
            for name, text in texts.items():
                acc[name]["identical"] += text == full
                acc[name]["rouge_vs_full"].append(rouge_l(text, full) if full else float(not text))
    return acc


def main(argv=None) -> int:
    from earlyexit.config import exit_code

    args = parse_args(argv)
    return exit_code(lambda: benchmark(args))


def benchmark(args) -> int:
    from earlyexit.runtime.loading import load_tokenizer, resolve_model_dir

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    parts = EngineParts(model_dir, tok, args)
    if args.memory_of:
        print(json.dumps(probe_memory(parts, args.memory_of)))
        return 0
    examples = load_examples(args, tok, model_dir)
    prompts = [tok.encode(ex.prompt)[-args.max_prompt_tokens:] for ex in examples]
    engines, unavailable = {}, {}
    for name, make in parts.factories().items():
        try:
            engines[name] = make()
        except PeerUnavailable as e:
            unavailable[name] = str(e)
    thresholds = parts.heads.cfg.thresholds if parts.has_heads else None
    n_layer = parts.ours.dims.n_layer
    rows = summarize(measure(engines, examples, prompts, args, tok), args.repeats * len(prompts), n_layer)
    memory = {} if args.no_memory else measure_memory(args, [r["engine"] for r in rows])
    for r in rows:
        r["memory_added_mb"] = memory.get(r["engine"])
    result = {"stamp": stamp(str(model_dir), vars(args)), "task": args.task, "thresholds": thresholds and vars(thresholds),
              "exit_layers": parts.heads.cfg.exit_layers if parts.has_heads else None, "rows": rows, "unavailable": unavailable,
              "baseline_added_mb": memory.get("baseline")}
    table = render(rows, unavailable, args, len(prompts), thresholds, memory, n_layer)
    out = write_results(args.out or "benchmark_generate" + ("_line" if args.task == "line" else ""), result, table,
                        script="benchmark_generate.py" + (" --task line" if args.task == "line" else ""))
    plot(rows, out / "ms_per_token.png")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
