"""Serve completions over HTTP, OpenAI's completions API (what editor plugins and the `openai` client speak).

    python -m earlyexit.serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--mode early-exit] [--api-key KEY]

Then, for example:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.completions.create(model="earlyexit-default", prompt="def fibonacci(n):", max_tokens=32, temperature=0)

Requests that arrive while others decode join the running batch at its next step (earlyexit.server.engine). The
decoding flags are the CLI's (`python -m earlyexit.generate`) and give each request's defaults; a request can change
the sampling, and under its `earlyexit` key the healing, n-gram cache, repetition stop and thresholds. Needs the `serve`
extra: `pip install "earlyexit[serve]"`. Binds to 127.0.0.1 unless told otherwise; `--api-key` (or EARLYEXIT_API_KEY,
which keeps the key out of the process list) makes every /v1 route ask for it.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import DEFAULT_MAX_DRAFT, OneLineParser, build_policy
from .errors import EarlyExitError


def build_parser() -> argparse.ArgumentParser:
    from .runtime.ngram_cache import DEFAULT_WEIGHT as DEFAULT_CACHE_WEIGHT

    p = OneLineParser(prog="python -m earlyexit.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--model-id", help="the name clients ask for (default: earlyexit-default, or the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("EARLYEXIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $EARLYEXIT_API_KEY, else none)")
    p.add_argument("--mode", choices=("full", "early-exit", "lossless"), help="as the CLI's (default: early-exit when the model has heads)")
    p.add_argument("--weights", choices=("fp32", "int8"), default="fp32", help="full and early-exit modes: int8 weights (default %(default)s)")
    p.add_argument("--exit-threshold", type=float, help="as the CLI's; a request may set its own under earlyexit.exit_threshold")
    p.add_argument("--stop-threshold", type=float, help="as the CLI's; a request may set its own under earlyexit.stop_threshold")
    p.add_argument("--exit-layers", metavar="LIST", help="as the CLI's")
    p.add_argument("--exit-rule", choices=("auto", "controller", "confidence"), default="auto", help="as the CLI's")
    p.add_argument("--max-draft", type=int, help=f"lossless mode: most tokens drafted per verification (default {DEFAULT_MAX_DRAFT})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the temperature of a request that names none (default %(default)s: greedy; OpenAI's is 1)")
    p.add_argument("--no-token-healing", action="store_true", help="requests' default: no token healing")
    p.add_argument("--no-repetition-stop", action="store_true", help="requests' default: no repetition stop")
    p.add_argument("--ngram-cache", type=float, default=DEFAULT_CACHE_WEIGHT, metavar="WEIGHT", help="requests' default n-gram cache weight")
    p.add_argument("--max-rows", type=int, default=8, help="requests decoded at once, one batch row each (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a row before the server answers 429 (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default %(default)s)")
    p.add_argument("--prompt-cache", type=int, default=32, metavar="TOKENS",
                   help="a request whose prompt begins with at least this many tokens of a row's last prompt takes that row and "
                        "prefills only the rest (an editor resends the file above the cursor); 0: off (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def build_service(args: argparse.Namespace):
    """Load the model and its policy as the CLI does, start the engine: the `Service` the app serves."""
    import torch

    from .runtime.decoding import GenerationSettings
    from .runtime.loading import load_runtime_model, resolve_model_dir
    from .server.app import Service
    from .server.engine import Engine

    if args.threads is not None:
        if args.threads < 1:
            raise EarlyExitError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.max_body_bytes < 1024:
        raise EarlyExitError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.api_key is not None and not args.api_key:
        raise EarlyExitError("--api-key is empty: give a key, or leave the flag out to serve without one")
    if args.mode != "lossless" and args.max_draft is not None:
        raise EarlyExitError("--max-draft applies to --mode lossless only")
    if args.weights == "int8" and args.mode == "lossless":
        raise EarlyExitError("--weights int8 does not apply to lossless mode: it verifies with the fp32 model")
    defaults = GenerationSettings(token_healing=not args.no_token_healing, stop_on_repetition=not args.no_repetition_stop,
                                  cache_weight=args.ngram_cache, temperature=args.temperature)
    model_dir = resolve_model_dir(args.model)
    model, tokenizer = load_runtime_model(model_dir)
    backbone = model
    if args.weights == "int8":
        from .runtime.quantize import quantize_int8

        model = quantize_int8(model)
    args.target_agreement, args.draft, args.draft_layers = None, None, None  # the CLI's flags build_policy reads that the server does not offer
    policy = build_policy(args, model, model_dir, backbone)
    model_id = args.model_id or ("earlyexit-default" if args.model is None else resolve_model_dir(args.model).name)
    engine = Engine(model, tokenizer, max_rows=args.max_rows, max_queue=args.max_queue, prompt_cache_min=args.prompt_cache)
    return Service(model=model, tokenizer=tokenizer, engine=engine, policy=policy, model_id=model_id, defaults=defaults,
                   api_key=args.api_key, max_body_bytes=args.max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from .server.app import create_app
    except ImportError as e:
        print(f"error: the server needs the serve extra ({e.name} is missing): pip install \"earlyexit[serve]\"", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be in [1, 65535], got {args.port}", file=sys.stderr)
        return 2
    try:
        service = build_service(args)
    except EarlyExitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    print(f"serving {service.model_id} ({service.policy.name}, {args.max_rows} rows) on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        service.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
