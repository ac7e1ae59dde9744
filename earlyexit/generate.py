"""Complete code from the command line.

    python -m earlyexit.generate "def fibonacci(n):"
    python -m earlyexit.generate --file snippet.py --max-new-tokens 32 --json
    echo "import os" | python -m earlyexit.generate

The prompt comes from the argument, from `--file`, or from standard input, in that order.
Without `--model` the embedded default model completes it. Errors in what was given
(an empty prompt, a missing model, a non-UTF-8 file, ...) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import EarlyExitError


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise EarlyExitError("give the prompt either as an argument or with --file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise EarlyExitError(f"cannot read prompt file {args.file}: {e.strerror}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EarlyExitError(f"prompt file {args.file} is not UTF-8 (byte {e.start})") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise EarlyExitError("no prompt: pass it as an argument, with --file, or on standard input")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError:
        raise EarlyExitError("standard input is not UTF-8") from None


def build_parser() -> argparse.ArgumentParser:
    from .decoding import GenerationSettings

    defaults = GenerationSettings()
    p = argparse.ArgumentParser(prog="python -m earlyexit.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", help="code to complete (else --file, else standard input)")
    p.add_argument("--file", help="read the prompt from this UTF-8 file")
    p.add_argument("--model", help="a local GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="at most this many tokens (default %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="end the completion before this string (repeatable)")
    p.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt too long for the context instead of refusing it")
    p.add_argument("--json", action="store_true", help="print text, token ids, layers and timings as JSON")
    return p


def run(args: argparse.Namespace) -> dict:
    from .decoding import GenerationSettings, generate
    from .loading import load_runtime_model

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop), truncate_prompt=args.truncate_prompt)
    prompt = read_prompt(args)
    if not prompt:  # checked before the model loads: no reason to wait seconds for this error
        raise EarlyExitError("prompt is empty: give at least one character of code to complete")
    model, tokenizer = load_runtime_model(args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        completion = generate(model, tokenizer, prompt, settings)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return {"prompt": prompt, **completion.to_dict()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except EarlyExitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["prompt"] + result["text"])
        n = len(result["token_ids"])
        ms = result["total_ms"]
        print(f"-- {n} tokens in {ms:.0f} ms, ended by {result['finish_reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
