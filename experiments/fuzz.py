"""Fuzz the front door: random bytes, text, settings, request bodies and damaged checkpoints, for as long as asked.

    python experiments/fuzz.py [--minutes 30] [--seed 0] [--targets prompt,settings,request,heads,weights]

Each target is a property with hypothesis strategies behind it, run in rounds of fresh random examples until the time
budget is spent (hypothesis itself has no time budget: each round is a `@given` run with its own seed). The property is
always the same: the input is taken (a result) or refused with `EarlyExitError` (or, for an HTTP body, pydantic's
`ValidationError`, which the server turns into a 400); any other exception is a finding, recorded with the input that
raised it (hypothesis shrinks it first).

- `prompt`: bytes as a prompt file or standard input (`cli.read_bounded`), escape processing (`cli.unescape`), then
  the tokenizer and the context check (`prepare_prompt`, healing on and off) on the embedded model.
- `settings`: `GenerationSettings` from random field values of every type, and `Thresholds`.
- `request`: random JSON bodies for `POST /v1/completions` (`CompletionRequest` and its bounds).
- `heads`: a tiny model's saved exit heads with their JSON mutated (fields removed, retyped, set to random values)
  or their safetensors bytes flipped and cut (`load_heads`).
- `weights`: a tiny checkpoint's `model.safetensors` and `config.json` damaged the same way (`load_runtime_model`).

Writes experiments/results/fuzz/ (results.json, results.md): minutes and examples per target, and every finding.
"""

from __future__ import annotations

import argparse
import builtins
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_results  # noqa: E402

TARGETS = ("prompt", "settings", "request", "heads", "weights")
GROUP = getattr(builtins, "ExceptionGroup", ())  # several distinct failures in one round (Python 3.11+)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="the whole budget, shared equally by the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--round-examples", type=int, default=200, help="examples per hypothesis round")
    return p.parse_args(argv)


class Finding(Exception):
    """An exception the front door should not have let through."""


def expect_refusal_or_result(fn, *args, allowed=()):
    from earlyexit.errors import EarlyExitError

    try:
        return fn(*args)
    except (EarlyExitError, *allowed):
        return None
    except Exception as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
        raise Finding(f"{type(e).__name__}: {e}".splitlines()[0][:300]) from e


def prompt_target(ctx):
    import io

    from hypothesis import strategies as st

    from earlyexit.cli import read_bounded, unescape
    from earlyexit.runtime.decoding import GenerationSettings, prepare_prompt

    model, tok = ctx["default"]
    settings = [GenerationSettings(max_new_tokens=16, token_healing=h) for h in (False, True)]

    def check(raw: bytes, heal: bool, escape: bool):
        text = expect_refusal_or_result(read_bounded, io.BytesIO(raw), "fuzz input")
        if text is None:
            return
        if escape:
            text = expect_refusal_or_result(unescape, text)
            if text is None:
                return
        expect_refusal_or_result(prepare_prompt, tok, model, text, settings[heal])

    texts = st.text(max_size=400).map(lambda s: s.encode("utf-8", "surrogatepass"))
    return check, (st.one_of(st.binary(max_size=2000), texts), st.booleans(), st.booleans())


def settings_target(ctx):
    from hypothesis import strategies as st

    from earlyexit.runtime.decoding import GenerationSettings
    from earlyexit.runtime.heads import Thresholds

    anything = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=5),
                         st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3), st.binary(max_size=4))
    fields = ["max_new_tokens", "stop_strings", "truncate_prompt", "token_healing", "healing_mode", "stop_on_repetition",
              "cache_weight", "cache_skip_recent", "temperature", "top_p", "seed"]

    def check(values: dict, exit_t, stop_t):
        expect_refusal_or_result(lambda: GenerationSettings(**values))
        expect_refusal_or_result(lambda: Thresholds(exit=exit_t, stop=stop_t))

    return check, (st.fixed_dictionaries({}, optional={f: anything for f in fields}), anything, anything)


def request_target(ctx):
    from hypothesis import strategies as st
    from pydantic import ValidationError

    from earlyexit.server.protocol import CompletionRequest, check_bounds

    json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                                         st.text(max_size=20)),
                               lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                               max_leaves=12)
    keys = st.sampled_from(["model", "prompt", "max_tokens", "stop", "stream", "temperature", "top_p", "seed", "n", "echo",
                            "logprobs", "earlyexit", "stream_options", "user", "suffix"])
    bodies = st.one_of(st.dictionaries(keys, json_values, max_size=8).map(json.dumps), st.binary(max_size=300))

    def check(body):
        req = expect_refusal_or_result(CompletionRequest.model_validate_json, body, allowed=(ValidationError,))
        if req is not None:
            expect_refusal_or_result(check_bounds, req)
            expect_refusal_or_result(lambda: (req.prompts(), req.stops()))

    return check, (bodies,)


def damage(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        if out:
            out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def heads_target(ctx):
    from hypothesis import strategies as st

    from earlyexit.runtime.heads import HEADS_CONFIG, HEADS_WEIGHTS, load_heads

    model, src = ctx["tiny"], ctx["tiny_dir"]
    raw_config = json.loads((src / HEADS_CONFIG).read_text())
    weights = (src / HEADS_WEIGHTS).read_bytes()
    work = ctx["work"] / "heads"
    values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False), st.text(max_size=70),
                       st.lists(st.integers(-2, 20), max_size=4), st.dictionaries(st.text(max_size=4), st.floats(allow_nan=False), max_size=3))

    def check(removed: list[str], changed: dict, flips, cut, damage_weights: bool):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        config = {k: v for k, v in raw_config.items() if k not in removed}
        config.update(changed)
        (work / HEADS_CONFIG).write_text(json.dumps(config))
        if damage_weights:
            (work / HEADS_WEIGHTS).write_bytes(damage(weights, flips, cut))
        expect_refusal_or_result(load_heads, work, model)

    fields = st.sampled_from(sorted(raw_config))
    return check, (st.lists(fields, max_size=3), st.dictionaries(fields, values, max_size=3),
                   st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=6), st.one_of(st.none(), st.integers(0, len(weights))),
                   st.booleans())


def weights_target(ctx):
    from hypothesis import strategies as st

    from earlyexit.runtime.loading import load_runtime_model

    src = ctx["tiny_dir"]
    weights, config = (src / "model.safetensors").read_bytes(), (src / "config.json").read_bytes()
    work = ctx["work"] / "weights"

    def check(which: str, flips, cut):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        if which == "weights":
            (work / "model.safetensors").write_bytes(damage(weights, flips, cut))
        else:
            (work / "config.json").write_bytes(damage(config, flips, cut))
        expect_refusal_or_result(load_runtime_model, work)

    return check, (st.sampled_from(["weights", "config"]), st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=6),
                   st.one_of(st.none(), st.integers(0, len(weights))))


def build_context(work: Path) -> dict:
    """The embedded model (its tokenizer and context) and a tiny saved checkpoint with heads, for the loaders."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.loading import load_runtime_model, load_tokenizer

    default = load_runtime_model()
    tiny_dir = work / "tiny"
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(default[1]), n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(tiny_dir)
    load_tokenizer().save_pretrained(tiny_dir)
    tiny, _ = load_runtime_model(tiny_dir)
    ExitHeads.for_backbone(tiny, rank=2).save(tiny_dir)
    return {"default": default, "tiny": tiny, "tiny_dir": tiny_dir, "work": work}


def run_target(name: str, ctx: dict, seconds: float, seed: int, per_round: int) -> dict:
    """Rounds of `per_round` fresh examples until `seconds` are spent; each distinct finding once (the shrunk input's)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    check, strategies = globals()[f"{name}_target"](ctx)
    findings: dict[str, dict] = {}
    examples = rounds = 0
    start = time.time()
    while time.time() - start < seconds:
        count = [0]

        def counted(args):
            count[0] += 1
            check(*args)

        test = settings(max_examples=per_round, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            given(st.tuples(*strategies))(counted))
        test._hypothesis_internal_use_seed = seed * 100_003 + rounds
        try:
            test()
        except (Finding, GROUP) as e:  # anything else is the harness's own failure, and stops the run
            group = e.exceptions if GROUP and isinstance(e, GROUP) else (e,)
            if not all(isinstance(x, Finding) for x in group):
                raise
            for x in group:
                cause = x.__cause__ or x
                findings.setdefault(str(x), {"target": name, "error": str(x), "where": traceback.format_exception(cause)[-2].strip()[:300]})
        examples += count[0]
        rounds += 1
    return {"target": name, "seconds": round(time.time() - start, 1), "rounds": rounds, "examples": examples,
            "findings": list(findings.values())}


def render(rows: list[dict], minutes: float) -> str:
    lines = [f"Fuzzed for {sum(r['seconds'] for r in rows) / 60:.1f} minutes (budget {minutes:g}), one target after another.", "",
             "| target | minutes | examples | findings |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['seconds'] / 60:.1f} | {r['examples']:,} | {len(r['findings'])} |")
    found = [f for r in rows for f in r["findings"]]
    lines += ["", "No input got past the front door as anything but a result or a one-line refusal." if not found else "Findings:"]
    lines += [f"- `{f['target']}`: {f['error']}" + (f" ({f['where']})" if f.get("where") else "") for f in found]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or args.minutes <= 0:
        print(f"error: --targets takes some of {','.join(TARGETS)} and --minutes a positive number", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = build_context(Path(tmp))
        rows = []
        for name in targets:
            rows.append(run_target(name, ctx, args.minutes * 60 / len(targets), args.seed, args.round_examples))
            print(f"{name}: {rows[-1]['examples']:,} examples, {len(rows[-1]['findings'])} findings", file=sys.stderr)
    result = {"stamp": stamp("earlyexit/default_model and a tiny checkpoint", vars(args)), "rows": rows,
              "findings": sum(len(r["findings"]) for r in rows)}
    out = write_results("fuzz", result, render(rows, args.minutes))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
