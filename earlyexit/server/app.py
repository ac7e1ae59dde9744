"""The HTTP front of the server (FastAPI): OpenAI's completions API over the engine.

    POST /v1/completions   a completion, or a stream of server-sent events ending with `data: [DONE]`
    GET  /v1/models        the one model served
    GET  /health           liveness and the engine's load (open without the API key)

Every request is checked before it reaches the engine, and a bad one gets OpenAI's error object with the runtime's
own one-line message: 400 (bad field, prompt too long for the context, thresholds out of range, sampling in lossless
mode), 401 (API key), 404 (another model), 413 (body too large), 429 (every row busy and the queue full).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import EarlyExitError
from ..runtime.decoding import GenerationSettings, check_reproducible, prepare_prompt
from ..runtime.heads import Thresholds
from ..runtime.policies import EarlyExit
from .engine import Busy, Engine, Job
from .protocol import (OPENAI_FINISH, CompletionRequest, check_bounds, chunk_body, completion_body, error_body, extension, new_id,
                       usage)

MAX_POLICIES = 16  # early-exit policies kept for requests' own thresholds


@dataclass
class Service:
    """What the routes serve: the model, its engine, the server's policy and the defaults a request may override."""

    model: object
    tokenizer: object
    engine: Engine
    policy: object
    model_id: str
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    _policies: dict = field(default_factory=dict)

    def settings_for(self, req: CompletionRequest) -> GenerationSettings:
        ext = req.earlyexit
        d = self.defaults
        return replace(
            d, max_new_tokens=req.max_tokens, stop_strings=req.stops(),
            temperature=d.temperature if req.temperature is None else req.temperature, top_p=req.top_p, seed=req.seed,
            token_healing=d.token_healing if ext is None or ext.token_healing is None else ext.token_healing,
            stop_on_repetition=d.stop_on_repetition if ext is None or ext.repetition_stop is None else ext.repetition_stop,
            cache_weight=d.cache_weight if ext is None or ext.ngram_cache is None else ext.ngram_cache)

    def policy_for(self, req: CompletionRequest):
        ext = req.earlyexit
        if ext is None or (ext.exit_threshold is None and ext.stop_threshold is None):
            return self.policy
        if not isinstance(self.policy, EarlyExit):
            raise EarlyExitError(f"earlyexit.exit_threshold and stop_threshold apply to early-exit mode; this server runs {self.policy.name}")
        base = self.policy.thresholds
        thresholds = Thresholds(exit=base.exit if ext.exit_threshold is None else ext.exit_threshold,
                                stop=base.stop if ext.stop_threshold is None else ext.stop_threshold)
        key = (thresholds.exit, thresholds.stop)
        if key not in self._policies:
            if len(self._policies) >= MAX_POLICIES:
                self._policies.pop(next(iter(self._policies)))  # the oldest: a request's policy lives on in its job
            layers = "all" if self.policy.exit_layers is None else sorted(self.policy.exit_layers)
            rule = self.policy.exit_rule  # under the confidence rule a request's exit threshold is the head's, every layer
            confidence = (self.policy.confidence if ext.exit_threshold is None else ext.exit_threshold) if rule == "confidence" else None
            self._policies[key] = EarlyExit(self.model, self.policy.heads, thresholds, exit_layers=layers, exit_rule=rule,
                                            confidence=confidence)
        return self._policies[key]


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


def _one_line(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _service(request: Request) -> Service:
    return request.app.state.service


def _unauthorized(service: Service, request: Request) -> JSONResponse | None:
    """None when the request may pass: no key is set, or it sent the right one (compared in constant time)."""
    if service.api_key is None:
        return None
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if hmac.compare_digest(token.encode(), service.api_key.encode()):
        return None
    return _error(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")


async def _internal(request: Request, e: Exception):  # a bug of ours: still one line in OpenAI's shape, never a page
    return _error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


# The routes read the service from the app they are mounted on (`create_app` puts it in app.state), so they can live
# at module level, each its own function, and serve any number of apps.
async def health(request: Request):
    service = _service(request)
    return {"status": "ok", "model": service.model_id, "mode": service.policy.name, **service.engine.load()}


async def models(request: Request):
    service = _service(request)
    if (denied := _unauthorized(service, request)) is not None:
        return denied
    return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0, "owned_by": "earlyexit"}]}


async def completions(request: Request):
    service = _service(request)
    if (denied := _unauthorized(service, request)) is not None:
        return denied
    body = await _read_body(request, service.max_body_bytes)
    if body is None:
        return _error(413, f"request body larger than {service.max_body_bytes:,} bytes")
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        return _error(400, _one_line(e))
    if (problem := check_bounds(req)) is not None:
        return _error(400, problem)
    if req.model != service.model_id:
        return _error(404, f"model {req.model!r} is not served here; this server serves {service.model_id!r} (GET /v1/models)",
                      param="model", code="model_not_found")
    prompts = req.prompts()
    try:
        settings = service.settings_for(req)
        policy = service.policy_for(req)
        check_reproducible(policy, None, settings)
        prepared = [await run_in_threadpool(prepare_prompt, service.tokenizer, service.model, p, settings) for p in prompts]
    except EarlyExitError as e:
        return _error(400, str(e))
    return await _run(service, request, req, prompts, prepared, settings, policy)


async def _run(service: Service, request: Request, req: CompletionRequest, prompts, prepared, settings, policy):
    """Submit one job per prompt, then answer with a stream or, once every job is done, one body."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emitter(index: int):
        return lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (index, kind, data))

    jobs = [Job(ids, healed, list(truncated), settings, policy, emitter(i)) for i, (ids, healed, truncated) in enumerate(prepared)]
    try:
        for job in jobs:
            service.engine.submit(job)
    except Busy as e:
        for job in jobs:
            job.cancel()
        return _error(429, str(e), kind="rate_limit_error", code="busy")
    except EarlyExitError as e:
        return _error(503, str(e), kind="server_error")
    cid, want_layers = new_id(), bool(req.earlyexit and req.earlyexit.exit_layers)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(service, cid, prompts, jobs, events, req.echo, want_layers, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(service, request, req, cid, prompts, jobs, events, want_layers)


async def _collect(service: Service, request: Request, req: CompletionRequest, cid: str, prompts, jobs, events: asyncio.Queue,
                   want_layers: bool):
    """The whole body once every job is done; an error or a client that left ends it early."""
    done: dict[int, object] = {}
    try:
        while len(done) < len(jobs):
            try:
                index, kind, data = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(error_body("client disconnected"), status_code=499)
                continue
            if kind == "error":
                return _error(500, data["message"], kind="server_error")
            if kind == "done":
                done[index] = data["completion"]
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished jobs; frees the rows of one left behind
    return completion_body(cid, service.model_id, prompts, [done[i] for i in range(len(jobs))], req.echo, want_layers)


async def _stream(service: Service, cid, prompts, jobs, events, echo: bool, want_layers: bool, include_usage: bool):
    finished: dict[int, object] = {}
    try:
        if echo:
            for i, p in enumerate(prompts):
                yield _sse(chunk_body(cid, service.model_id, i, p))
        while len(finished) < len(jobs):
            index, kind, data = await events.get()
            if kind == "text":
                yield _sse(chunk_body(cid, service.model_id, index, data["text"]))
            elif kind == "done":
                c = finished[index] = data["completion"]
                ext = extension(c, want_layers)
                if data["retracted"]:
                    ext["retracted_chars"] = data["retracted"]
                yield _sse(chunk_body(cid, service.model_id, index, "", OPENAI_FINISH[c.finish_reason], ext))
            else:
                finished[index] = None
                yield _sse(error_body(data["message"], kind="server_error"))
        if include_usage:
            yield _sse({"id": cid, "object": "text_completion", "model": service.model_id, "choices": [],
                        "usage": usage([c for c in finished.values() if c is not None])})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:  # the client left (or the stream ended): rows still running are freed at their next token
            job.cancel()


def create_app(service: Service) -> FastAPI:
    """The app serving `service`: the routes above (GET /health, GET /v1/models, POST /v1/completions), and OpenAI's
    error object for anything they did not catch."""
    app = FastAPI(title="earlyexit", description="OpenAI-compatible completions over the earlyexit runtime")
    app.state.service = service
    app.add_exception_handler(Exception, _internal)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.post("/v1/completions")(completions)
    return app
