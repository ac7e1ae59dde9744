"""The OpenAI completions API as this server speaks it: the request it takes (typed, bounded, unknown fields refused)
and the objects it answers with (completions, stream chunks, errors).

Where it departs from OpenAI's defaults, it says so: `temperature` defaults to the server's
`--temperature` (0, greedy, unless set: lossless mode cannot sample); `n` and `best_of` are
1; `logprobs` and penalties are not offered. The runtime's own figures ride under the
extension key `earlyexit` of each choice.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.decoding import Completion

MAX_PROMPTS = 16  # prompts in one request (each becomes a row of the batch)
MAX_STOPS = 16
MAX_STOP_CHARS = 256

# our finish reasons in OpenAI's two words; "cancelled" never reaches a client (it left)
OPENAI_FINISH = {"eos": "stop", "stop_string": "stop", "stop": "stop", "repetition": "stop", "stopping_criteria": "stop",
                 "max_tokens": "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Extension(_Strict):
    """`earlyexit`: the runtime's own switches for one request (each defaults to the server's, as the CLI's)."""

    token_healing: bool | None = None
    ngram_cache: float | None = Field(None, ge=0, le=1)
    repetition_stop: bool | None = None
    exit_threshold: float | None = Field(None, ge=0, le=1)
    stop_threshold: float | None = Field(None, ge=0, le=1)
    exit_layers: bool = False  # answer with the layer each token left at


class StreamOptions(_Strict):
    include_usage: bool = False


class CompletionRequest(_Strict):
    model: str = Field(max_length=256)
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    echo: bool = False
    user: str | None = Field(None, max_length=256)
    logprobs: None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)  # accepted only as 0: no penalties here
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    earlyexit: Extension | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def check_bounds(req: CompletionRequest) -> str | None:
    """What pydantic's field types do not say: list sizes and stop lengths; the message, or None."""
    if isinstance(req.prompt, list) and not 1 <= len(req.prompt) <= MAX_PROMPTS:
        return f"prompt: a list of 1 to {MAX_PROMPTS} strings, got {len(req.prompt)}"
    stops = req.stops()
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        return f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each"
    return None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def extension(c: Completion, want_layers: bool) -> dict:
    ext = {"finish_reason": c.finish_reason, "mean_layers": round(c.mean_layers, 3), "prefill_ms": round(c.prefill_ms, 3),
           "decode_ms": round(sum(c.token_ms), 3), "prompt_truncated_tokens": c.prompt_truncated_tokens}
    if c.speculation:
        ext["speculation"] = c.speculation
    if want_layers:
        ext["exit_layers"] = c.exit_layers
    return ext


def usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    written = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": written, "total_tokens": prompt + written}


def completion_body(cid: str, model: str, prompts: list[str], completions: list[Completion], echo: bool, want_layers: bool) -> dict:
    choices = [{"index": i, "text": (p if echo else "") + c.text, "logprobs": None, "finish_reason": OPENAI_FINISH[c.finish_reason],
                "earlyexit": extension(c, want_layers)} for i, (p, c) in enumerate(zip(prompts, completions))]
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(completions)}


def chunk_body(cid: str, model: str, index: int, text: str, finish: str | None = None, ext: dict | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if ext is not None:
        choice["earlyexit"] = ext
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}
