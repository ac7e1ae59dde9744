r"""Complete code from the command line.

    python -m earlyexit.generate "def fibonacci(n):"
    python -m earlyexit.generate --file snippet.py --max-new-tokens 32 --json
    echo "import os" | python -m earlyexit.generate

The prompt comes from the argument, from `--file`, or from standard input, in that order.
Escape sequences in the prompt argument and in `--stop` are processed (`\n`, `\t`, `\r`, `\\`,
`\'`, `\"`), as llama.cpp's CLI does; `--no-escape` takes them literally. A file or standard input is read
as it is, at most MAX_PROMPT_BYTES. Without `--model` the embedded default model completes it. Errors in what
was given (an empty prompt, a missing model, a non-UTF-8 file, a bad flag, ...) print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .errors import EarlyExitError

DEFAULT_MAX_DRAFT = 12


MAX_PROMPT_BYTES = 4 * 1024 * 1024  # what --file and standard input may hold (/dev/zero must not fill the memory)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """llama.cpp's escapes: \\n \\t \\r \\\\ \\' \\" become the characters; any other backslash stays as it is."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_bounded(f, where: str) -> str:
    raw = f.read(MAX_PROMPT_BYTES + 1)
    if len(raw) > MAX_PROMPT_BYTES:
        raise EarlyExitError(f"{where} holds more than {MAX_PROMPT_BYTES:,} bytes, the most a prompt may have")
    if isinstance(raw, str):  # a text stream with no bytes underneath (already decoded)
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EarlyExitError(f"{where} is not UTF-8 (byte {e.start})") from None


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise EarlyExitError("give the prompt either as an argument or with --file, not both")
    if args.prompt is not None:
        return args.prompt if args.no_escape else unescape(args.prompt)
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                return read_bounded(f, f"prompt file {args.file}")
        except OSError as e:
            raise EarlyExitError(f"cannot read prompt file {args.file}: {e.strerror}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise EarlyExitError("no prompt: pass it as an argument, with --file, or on standard input")
    return read_bounded(getattr(sys.stdin, "buffer", sys.stdin), "standard input")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .runtime.decoding import GenerationSettings
    from .runtime.ngram_cache import DEFAULT_WEIGHT as DEFAULT_CACHE_WEIGHT

    defaults = GenerationSettings()
    p = OneLineParser(prog="python -m earlyexit.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", help="code to complete (else --file, else standard input)")
    p.add_argument("--file", help="read the prompt from this UTF-8 file")
    p.add_argument("--model", help="a local GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="at most this many tokens (default %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="end the completion before this string (repeatable)")
    p.add_argument("--no-escape", action="store_true",
                   help="take \\n, \\t, ... in the prompt argument and --stop literally (by default they are processed)")
    p.add_argument("--no-token-healing", action="store_true", help="do not back off a prompt's partial last word (healing is on by default)")
    p.add_argument("--no-repetition-stop", action="store_true",
                   help="let a completion that loops (a line, block or phrase written again) run on (by default it ends with one copy)")
    p.add_argument("--ngram-cache", type=float, metavar="WEIGHT", default=DEFAULT_CACHE_WEIGHT,
                   help="blend weight in [0, 1] of the n-gram cache, which copies what followed the same tokens earlier in the prompt "
                        "(all of it, the part --truncate-prompt drops included) into the next-token distribution; 0 turns it off "
                        "(default: %(default)s; lossless mode writes full mode's tokens with the same cache)")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="0 writes the greedy tokens; above 0 each token is drawn from the model's distribution at this temperature "
                        "(full and early-exit modes) (default %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="sampling: draw from the smallest set of tokens holding this "
                   "much probability (default %(default)s: all)")
    p.add_argument("--seed", type=int, help="sampling: the seed of the draws, for a completion that can be drawn again")
    p.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt too long for the context instead of refusing it")
    p.add_argument("--mode", choices=("full", "early-exit", "lossless"),
                   help="early-exit (the default when the model has exit heads), full depth, "
                        "or lossless (full's exact tokens, drafted cheaply and verified)")
    p.add_argument("--max-draft", type=int, help=f"lossless mode: most tokens drafted per verification (default {DEFAULT_MAX_DRAFT})")
    p.add_argument("--draft", choices=("auto", "int8", "same"),
                   help="lossless mode: draft with a weight-only int8 copy of the model (auto: for an fp32 model on the CPU) "
                        "or the model itself; the output is the same either way (default %(default)s)")
    p.add_argument("--draft-layers", type=int, metavar="E",
                   help="lossless mode: draft with the model's own first E blocks and exit head E-1 (LayerSkip), verified "
                        "from block E on; the output is the same (default: drafts from the whole model, see --draft)")
    p.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                   help="full and early-exit modes: run a weight-only int8 copy of the model (faster on a CPU, tokens may differ "
                        "from fp32; lossless mode always verifies in fp32) (default %(default)s)")
    p.add_argument("--exit-threshold", type=float,
                   help="exit when p(exit) is the largest and above this, in [0, 1]; 1 disables exits "
                        "(default: the heads' calibrated value; lossless with an int8 draft: 1)")
    p.add_argument("--target-agreement", type=float, metavar="RATE",
                   help="choose the exit threshold from the heads' calibration table so tokens agree with the full model at this rate "
                        "(the fixed-sequence test of earlyexit.training.calibrate, same confidence); instead of --exit-threshold")
    p.add_argument("--stop-threshold", type=float,
                   help="stop when p(stop) is the largest and above this, in [0, 1]; 1 disables stopping "
                        "(default: the heads' calibrated value; lossless: 1)")
    p.add_argument("--exit-rule", choices=("auto", "controller", "confidence"), default="auto",
                   help="early-exit mode: who decides an exit: the controller's p(exit) (the study's rule), or the exit head's own "
                        "confidence (its max probability, against per-layer thresholds from earlyexit.training.confidence_rule; "
                        "--exit-threshold then sets one for every layer); auto: confidence where the heads carry its thresholds "
                        "(default %(default)s)")
    p.add_argument("--exit-layers", metavar="LIST",
                   help="early-exit mode: ask the controller only after these blocks, 1-based and comma-separated (e.g. 3,6,9), "
                        "or 'all' (default: the heads' choice, earlyexit.training.exit_layers, else all)")
    p.add_argument("--stats", action="store_true", help="show each token with the layer it left at")
    p.add_argument("--json", action="store_true", help="print text, token ids, layers and timings as JSON")
    return p


def build_policy(args: argparse.Namespace, model, model_dir, backbone=None):
    """The decoding policy the flags ask for; early-exit by default when the model has heads.
    `backbone`: the fp32 model the heads are checked against when `model` is a quantized copy."""
    from .runtime.heads import Thresholds, heads_available, load_heads
    from .runtime.policies import EarlyExit, FullDepth
    from .runtime.speculative import Lossless

    mode = args.mode or ("early-exit" if heads_available(model_dir) else "full")
    rule = getattr(args, "exit_rule", "auto")
    if mode != "early-exit" and rule != "auto":
        raise EarlyExitError("--exit-rule applies to --mode early-exit only")
    if mode == "full":
        if args.exit_threshold is not None or args.stop_threshold is not None or args.target_agreement is not None:
            raise EarlyExitError("--exit-threshold, --target-agreement and --stop-threshold apply to --mode early-exit only")
        if args.exit_layers is not None:
            raise EarlyExitError("--exit-layers applies to --mode early-exit only")
        return FullDepth()
    heads = load_heads(model_dir, backbone or model)
    defaults = heads.cfg.thresholds
    if args.target_agreement is not None:
        args.exit_threshold = calibrated_exit(heads, args.target_agreement)
    if mode == "lossless" and args.exit_layers is not None:
        raise EarlyExitError("--exit-layers applies to --mode early-exit only")
    if mode == "lossless":  # full's exact tokens: the controller stops only when asked to
        return Lossless(model, heads, args.exit_threshold, max_draft=args.max_draft or DEFAULT_MAX_DRAFT, draft=args.draft or "auto",
                        stop_threshold=1.0 if args.stop_threshold is None else args.stop_threshold, draft_layers=args.draft_layers)
    thresholds = Thresholds(
        exit=defaults.exit if args.exit_threshold is None else args.exit_threshold,
        stop=defaults.stop if args.stop_threshold is None else args.stop_threshold,
    )
    # as EarlyExit resolves "auto": the confidence rule wherever the heads were calibrated for it, {} included (a
    # calibration that found no exit paying: no exits, not the controller's)
    confident = rule == "confidence" or (rule == "auto" and heads.cfg.exit_confidence is not None)
    if confident and args.exit_layers is not None:
        raise EarlyExitError("--exit-layers applies to the controller's exits; the confidence rule exits where its thresholds "
                             "were calibrated (earlyexit.training.confidence_rule): add --exit-rule controller")
    if confident and args.target_agreement is not None:
        raise EarlyExitError("--target-agreement chooses the controller's threshold: add --exit-rule controller")
    return EarlyExit(model, heads, thresholds, exit_layers=parse_exit_layers(args.exit_layers), exit_rule=rule,
                     confidence=args.exit_threshold if confident else None)


def parse_exit_layers(text: str | None):
    """--exit-layers: None (the heads' choice), "all", or 1-based block numbers -> EarlyExit's 0-based indices."""
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    try:
        return [int(part) - 1 for part in text.split(",")]
    except ValueError:
        raise EarlyExitError(f"--exit-layers takes 'all' or comma-separated block numbers such as 3,6,9, got {text!r}") from None


def calibrated_exit(heads, target: float) -> float:
    """The exit threshold certified for `target` by the stored calibration table (earlyexit.training.calibrate)."""
    from .training.calibrate import choose_threshold

    cal = heads.cfg.calibration
    if not cal.get("table"):
        raise EarlyExitError("these exit heads have no calibration table: run python -m earlyexit.training.calibrate first")
    return choose_threshold(cal["table"], target, cal["delta"])[0]


def run(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from .runtime.decoding import GenerationSettings, check_text, complete
    from .runtime.heads import Thresholds
    from .runtime.loading import load_runtime_model, resolve_model_dir

    stops = tuple(s if args.no_escape else unescape(s) for s in args.stop)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, stop_strings=stops, truncate_prompt=args.truncate_prompt,
                                  token_healing=not args.no_token_healing, stop_on_repetition=not args.no_repetition_stop,
                                  cache_weight=args.ngram_cache, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.mode == "lossless" and settings.temperature > 0:
        raise EarlyExitError(f"--mode lossless writes full mode's greedy tokens and does not sample (--temperature {settings.temperature:g}): "
                             "use --temperature 0, or --mode full or early-exit to sample")
    Thresholds(exit=1.0 if args.exit_threshold is None else args.exit_threshold,
               stop=1.0 if args.stop_threshold is None else args.stop_threshold)  # validate before loading anything
    if args.target_agreement is not None:
        if args.exit_threshold is not None:
            raise EarlyExitError("give either --exit-threshold or --target-agreement, not both")
        if not 0.0 < args.target_agreement < 1.0:
            raise EarlyExitError(f"--target-agreement must be in (0, 1), got {args.target_agreement}")
    if args.mode != "lossless" and (args.max_draft is not None or args.draft is not None or args.draft_layers is not None):
        raise EarlyExitError("--max-draft, --draft and --draft-layers apply to --mode lossless only")
    if args.max_draft is not None and args.max_draft < 1:
        raise EarlyExitError(f"--max-draft must be a positive integer, got {args.max_draft}")
    if args.weights == "int8" and args.mode == "lossless":
        raise EarlyExitError("--weights int8 does not apply to lossless mode: it verifies with the fp32 model "
                             "(its drafts are int8 already, see --draft)")
    prompt = read_prompt(args)
    check_text(prompt)  # before the model loads: no reason to wait seconds for this error
    model_dir = resolve_model_dir(args.model)
    model, tokenizer = load_runtime_model(model_dir)
    backbone = model  # what the exit heads were trained on (their checkpoint names its weights' hash)
    if args.weights == "int8":
        from .runtime.quantize import quantize_int8

        model = quantize_int8(model)
    policy = build_policy(args, model, model_dir, backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        completion = complete(model, tokenizer, prompt, settings, policy=policy)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    result = {"prompt": prompt, "mode": policy.name, "weights": args.weights, "n_layer": model.dims.n_layer, "ngram_cache": settings.cache_weight,
              **completion.to_dict()}
    if hasattr(policy, "thresholds"):
        result["thresholds"] = asdict(policy.thresholds)
    result["tokens"] = [tokenizer.decode([t]) for t in completion.token_ids]
    return result


# What each finish reason means to someone at the command line, and the flag that changes it.
FINISH_NOTES = {
    "eos": "the model ended the text",
    "max_tokens": "--max-new-tokens reached",
    "stop": "the controller predicted that the next tokens would be wrong (--stop-threshold 1 writes on)",
    "stop_string": "a --stop string came next",
    "repetition": "the completion began to loop, one copy kept (--no-repetition-stop writes on)",
    "stopping_criteria": "a stopping criterion",
}


def ended_by(result: dict) -> str:
    reason = result["finish_reason"]
    return f"ended by {reason}: {FINISH_NOTES[reason]}"


def format_stats(result: dict) -> str:
    """Each token with the layer it left at, as a bar a terminal can show."""
    L = result["n_layer"]
    lines = [f"{'layer':>7}  token"]
    for token, layers in zip(result["tokens"], result["exit_layers"]):
        lines.append(f"{layers:>3}/{L:<3}  {'#' * layers}{'.' * (L - layers)}  {token!r}")
    n = len(result["exit_layers"])
    mean = result["mean_layers"]
    lines.append(f"{n} tokens, mean {mean:.2f} of {L} layers ({1 - mean / L:.1%} skipped), mode {result['mode']}, "
                 f"{ended_by(result)}")
    spec = result.get("speculation") or {}
    if spec.get("drafted"):
        lines.append(f"lossless: {spec['accepted']} of {spec['drafted']} drafted tokens accepted ({spec['acceptance_rate']:.0%}) "
                     f"in {spec['rounds']} verification passes ({spec.get('draft', 'same')} drafts)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except EarlyExitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        show(args, result)
    except BrokenPipeError:  # `| head` closed the pipe: nothing more to say, and no traceback about it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def show(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.stats:
        print(result["prompt"] + result["text"], flush=True)
        print(format_stats(result), file=sys.stderr)
    else:
        print(result["prompt"] + result["text"])
        n = len(result["token_ids"])
        ms = result["total_ms"]
        print(f"-- {n} tokens in {ms:.0f} ms, mean {result['mean_layers']:.1f}/{result['n_layer']} layers ({result['mode']}), "
              f"{ended_by(result)}", file=sys.stderr)
    sys.stdout.flush()  # inside the BrokenPipeError guard


if __name__ == "__main__":
    sys.exit(main())
