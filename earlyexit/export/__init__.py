"""Exports for other engines: ONNX with the KV cache (`onnx`), the GGML GPT-2 layout (`ggml`) and GGUF (`gguf`, llama.cpp)."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence


def export_main(argv: Sequence[str] | None, module: str, doc: str, suffix: str, write: Callable, options=()) -> int:
    """The command line every exporter shares: OUT, --model DIR and `options` ((flag, add_argument kwargs) pairs);
    `write(model, tokenizer, out, args)` returns the path written. A bad input is one `error:` line and exit 2."""
    from ..config import exit_code
    from ..runtime.loading import load_runtime_model, resolve_model_dir

    p = argparse.ArgumentParser(prog=f"python -m earlyexit.export.{module}", description=doc.split("\n\n")[0])
    p.add_argument("out", help=f"the {suffix} file to write")
    p.add_argument("--model", help="a local GPT-2 checkpoint directory (default: the embedded model)")
    for flag, kwargs in options:
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)

    def run():
        model, tok = load_runtime_model(resolve_model_dir(args.model))
        print(f"wrote {write(model, tok, args.out, args)}")

    return exit_code(run)
