"""The completion server under load: 1, 4 and 16 concurrent clients, batched against one request at a time, and
against llama.cpp's OpenAI server on the same weights.

    python experiments/serve_load.py [--model DIR] [--prompts 32] [--clients 1,4,16] [--threads 2] [--no-peer]

Held-out line completions (the test split, each prompt cut inside a line; stop at the line's end, at most
--max-tokens), greedy, sent over HTTP by client threads that each take the next prompt as soon as their last one is
answered. For each server and each number of clients: requests/s, completion tokens/s, and the p50/p95 latency of a
request; batched against one-at-a-time as ratios at the same load. Servers, each a subprocess on a free port, started
and measured one after another (nothing else running):
  - ours, batched: `python -m earlyexit.serve --max-rows 16` (requests join the running batch);
  - ours, one at a time: `--max-rows 1` (the rest wait in the queue);
  - llama.cpp: `python -m llama_cpp.server` over the model written as an fp32 GGUF (earlyexit.export.gguf), where
    `llama-cpp-python[server]` is installed (skipped, and said so, where not).
Our two servers' completions are compared text for text (batched rows must write what one row writes alone).

Then an editor's typing (`--sessions`): from a held-out line, the file above it is sent again and again as the cursor
moves on through the next --keystrokes pieces of --step characters (the same start, a longer end each time), one
client, one request after another; the p50 latency with our prompt cache (`--prompt-cache`, the default) against
without it (`--prompt-cache 0`), and llama.cpp's server (which reuses its last prompt's prefix too).
Writes experiments/results/serve_load/ (results.json, results.md, load.png).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, stamp, test_split_files, write_results  # noqa: E402

MODEL_ID = "served"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GPT-2 checkpoint directory (default: the embedded model)")
    p.add_argument("--prompts", type=int, default=32, help="held-out line prompts sent at each load")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--mode", choices=("full", "early-exit", "lossless"), default="early-exit", help="our servers' mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp's server")
    p.add_argument("--sessions", type=int, default=8, help="typing scenario: editor sessions (0: skip the scenario)")
    p.add_argument("--keystrokes", type=int, default=6, help="typing scenario: requests per session")
    p.add_argument("--step", type=int, default=12, help="typing scenario: characters typed between requests")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free port, up once `ready_path` answers 200."""

    def __init__(self, name: str, argv: list[str], ready_path: str):
        self.name, self.port = name, free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.base, self.ready_path = f"http://127.0.0.1:{self.port}", ready_path

    def __enter__(self):
        import httpx

        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not come up in 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(base: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Every prompt once, from `clients` threads: wall time, each request's latency, text and completion tokens."""
    import httpx

    todo, lock = list(enumerate(prompts)), threading.Lock()
    latency, texts, tokens, errors = {}, {}, {}, []

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i, prompt = todo.pop(0)
                t0 = time.perf_counter()
                r = http.post(base + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                               "stop": ["\n"], "temperature": 0})
                latency[i] = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                texts[i], tokens[i] = body["choices"][0]["text"], body["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = list(latency.values())
    return {"clients": clients, "requests": len(prompts), "errors": errors, "wall_s": wall,
            "requests_per_s": len(texts) / wall, "tokens_per_s": sum(tokens.values()) / wall,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "texts": [texts.get(i) for i in range(len(prompts))]}


def typing_sessions(files, args) -> list[list[str]]:
    """Per session, the growing prompts an editor sends: a fixed start, the end moving on by `step` characters."""
    import random

    rng = random.Random(args.seed + 1)
    budget = 4 * args.max_prompt_tokens  # characters, as the line prompts: the context holds the longest one
    long_files = [f["text"] for f in files if len(f["text"]) > budget + args.step * args.keystrokes]
    if not long_files:
        return []
    sessions = []
    for _ in range(args.sessions):
        text = rng.choice(long_files)
        end = rng.randrange(budget // 2, len(text) - args.step * args.keystrokes)
        start = text.rfind("\n", 0, end - budget // 2) + 1
        sessions.append([text[start:end + k * args.step] for k in range(args.keystrokes)])
    return sessions


def typing(base: str, model: str, sessions: list[list[str]], max_tokens: int) -> dict:
    """Each session's prompts in order from one client: the latency of each request after the session's first."""
    import httpx

    latency, texts = [], []
    with httpx.Client(timeout=600) as http:
        for prompts in sessions:
            for k, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                r = http.post(base + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                               "stop": ["\n"], "temperature": 0})
                if k:
                    latency.append((time.perf_counter() - t0) * 1e3)
                texts.append(r.json()["choices"][0]["text"] if r.status_code == 200 else None)
    return {"requests": len(latency), "p50_ms": percentile(latency, 50), "p95_ms": percentile(latency, 95), "texts": texts}


def servers(args, gguf: Path | None) -> list[Server]:
    ours = [sys.executable, "-m", "earlyexit.serve", "--port", "{port}", "--model-id", MODEL_ID, "--mode", args.mode,
            "--threads", str(args.threads), "--max-queue", "256"] + (["--model", args.model] if args.model else [])
    out = [Server("ours, batched", ours + ["--max-rows", "16"], "/health"),
           Server("ours, one at a time", ours + ["--max-rows", "1"], "/health")]
    if args.sessions:
        out.append(Server("ours, no prompt cache", ours + ["--max-rows", "16", "--prompt-cache", "0"], "/health"))
    if gguf is not None:
        out.append(Server("llama.cpp server (fp32 GGUF)",
                          [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ID,
                           "--port", "{port}", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                           "--n_ctx", "1024"], "/v1/models"))
    return out


def peer_gguf(args, workdir: Path) -> tuple[Path | None, str | None]:
    """The model as an fp32 GGUF for llama.cpp's server, or why there is none."""
    if args.no_peer:
        return None, "--no-peer"
    try:
        import llama_cpp.server.app  # noqa: F401 - the [server] extra's dependencies come with it
    except ImportError as e:
        return None, f"llama-cpp-python[server] is not installed ({e.name})"
    from earlyexit.export.gguf import write_gguf
    from earlyexit.runtime.loading import load_runtime_model

    path = workdir / "model-f32.gguf"
    write_gguf(*load_runtime_model(args.model), path, "f32")
    return path, None


def render(rows: list[dict], skipped: str | None, args, same: float) -> str:
    base = {r["clients"]: r for r in rows if r["server"] == "ours, one at a time"}
    peer = {r["clients"]: r for r in rows if r["server"].startswith("llama.cpp")}
    n = rows[0]["requests"] if rows else args.prompts
    lines = [f"{n} held-out line completions (each prompt within the context with room for the completion; stop at the "
             f"line's end, at most {args.max_tokens} tokens), greedy, "
             f"our servers in {args.mode} mode, {args.threads} threads each; each row sends every prompt once from that many "
             "concurrent clients.", "",
             "| server | clients | requests/s | tokens/s | p50 ms | p95 ms | tokens/s vs one at a time | tokens/s vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p = base.get(r["clients"]), peer.get(r["clients"])
        vs_b = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}×" if b and b["tokens_per_s"] else "-"
        vs_p = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}×" if p and p["tokens_per_s"] else "-"
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {vs_b} | {vs_p} |" + (f" {len(r['errors'])} errors" if r["errors"] else ""))
    lines += ["", f"Batched completions identical to one-at-a-time ones: {same:.1%}."]
    if skipped:
        lines.append(f"llama.cpp's server: skipped ({skipped}).")
    lines += ["", "![throughput and p95 latency by clients](load.png)"]
    return "\n".join(lines) + "\n"


def render_typing(typed: list[dict], same: float | None, args) -> str:
    if not typed:
        return ""
    base = next((t for t in typed if t["server"] == "ours, no prompt cache"), None)
    lines = ["", f"An editor's typing: {args.sessions} sessions of {args.keystrokes} requests each, the file above the cursor "
             f"resent after every {args.step} characters typed, one client; latency of each request after a session's first:", "",
             "| server | requests | p50 ms | p95 ms | p50 vs ours without the prompt cache |", "|---|---|---|---|---|"]
    for t in typed:
        ratio = f"{base['p50_ms'] / t['p50_ms']:.2f}×" if base and t["p50_ms"] else "-"
        lines.append(f"| {t['server']} | {t['requests']} | {t['p50_ms']:.0f} | {t['p95_ms']:.0f} | {ratio} |")
    if same is not None:
        lines += ["", f"Completions with the prompt cache identical to those without it: {same:.1%}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        a.plot([r["clients"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=name)
        b.plot([r["clients"] for r in mine], [r["p95_ms"] for r in mine], marker="o", label=name)
    for ax, label in ((a, "completion tokens/s"), (b, "p95 request latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from earlyexit.data.corpus import line_cut_examples
    from earlyexit.runtime.loading import load_tokenizer, resolve_model_dir

    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    files = test_split_files(resolve_model_dir(args.model))
    prompts = [e.prompt for e in line_cut_examples(files, args.prompts, max_prompt_chars=4 * args.max_prompt_tokens, seed=args.seed)]
    # characters only estimate tokens: keep the prompts that leave room for the completion in the context, so every
    # server gets the same requests and none is refused
    model_dir = resolve_model_dir(args.model)
    tok, context = load_tokenizer(model_dir), json.loads((model_dir / "config.json").read_text())["n_positions"]
    prompts = [p for p in prompts if len(tok.encode(p)) + args.max_tokens <= context]
    sessions = typing_sessions(files, args) if args.sessions else []
    rows, texts, typed = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        gguf, skipped = peer_gguf(args, Path(tmp))
        for server in servers(args, gguf):
            with server:
                load(server.base, MODEL_ID, prompts[:2], 1, args.max_tokens)  # warm-up
                for c in (clients if server.name != "ours, no prompt cache" else []):
                    r = load(server.base, MODEL_ID, prompts, c, args.max_tokens)
                    texts[(server.name, c)] = r.pop("texts")
                    rows.append({"server": server.name, **r})
                    print(f"{server.name}, {c} clients: {r['tokens_per_s']:.1f} tokens/s, p95 {r['p95_ms']:.0f} ms", file=sys.stderr)
                if sessions and server.name != "ours, one at a time":
                    t = typing(server.base, MODEL_ID, sessions, args.max_tokens)
                    typed.append({"server": server.name, **t})
                    print(f"{server.name}, typing: p50 {t['p50_ms']:.0f} ms", file=sys.stderr)
    pairs = [(a, b) for c in clients for a, b in zip(texts[("ours, batched", c)], texts[("ours, one at a time", c)])]
    same = sum(a == b for a, b in pairs) / max(1, len(pairs))
    config = {k: v for k, v in vars(args).items()}
    ours_typed = {t["server"]: t for t in typed}
    cached, uncached = ours_typed.get("ours, batched"), ours_typed.get("ours, no prompt cache")
    typing_same = (sum(a == b for a, b in zip(cached["texts"], uncached["texts"])) / max(1, len(cached["texts"]))
                   if cached and uncached else None)
    result = {"stamp": stamp(str(resolve_model_dir(args.model)), config), "rows": rows, "identical_batched_vs_alone": same,
              "typing": [{k: v for k, v in t.items() if k != "texts"} for t in typed], "typing_identical_cached_vs_not": typing_same,
              "peer_skipped": skipped}
    out = write_results("serve_load", result, render(rows, skipped, args, same) + render_typing(result["typing"], typing_same, args))
    plot(rows, out / "load.png")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
