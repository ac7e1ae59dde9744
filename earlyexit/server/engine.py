"""The server's decoding engine: requests that arrive while others decode join the running batch at the next step.

One worker thread owns the model and one KV cache with a row per concurrent request
(`KVCache.row` gives a request its own batch-1 view of it). Each turn of its loop it admits
waiting requests into free rows (prefill and first token, alone, at batch 1), then moves every
running row one token: rows under the same policy step together through `Policy.step_batch`
(each at its own position, exiting and stopping on its own, as `complete_batch` does), a
lone row through `Policy.step` (the lean single-token path). A row that finishes, or whose
client went away (`Job.cancel`), leaves at once and frees its row for the next request.

Tokens are the ones `complete` writes for the prompt alone: the same prefill, the same
`Transcript` (healing, n-gram cache, stop strings, repetition stop, sampling with the
request's own seeded generator), and batched steps equal to single ones (tested).

A speculative request (lossless mode) drafts and verifies in rounds that are not yet a batch
step: it runs to its end when admitted, and the other rows wait for it.

The prompt cache (`prompt_cache_min` > 0): a row remembers the prompt it prefilled, and a new
request whose prompt begins with at least that many of the same tokens takes that row and
prefills only the rest (an editor sends the file above the cursor again and again, a little
longer each time). Only prefilled positions are reused, never a completion's own (which early
exit fills by state copying). The reused K/V are the ones a whole prefill computes, to float
rounding: attention over a cached prefix sums in another order, so a near-tie can, rarely, go the
other way than in `complete` (llama.cpp's server has the same property); 0 turns it off.

Text reaches the client as it is written (`StreamingTranscript`), minus what a later token
could still take back: a trailing partial character, or a tail that may be the beginning of
a stop string. A repetition stop removes a loop's second copy after it was written; a stream
has sent it by then, and the last event says how many characters the final text dropped.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import EarlyExitError
from ..runtime.decoding import Completion, GenerationSettings, Transcript, per_kept_token
from ..runtime.model import GPT2
from ..runtime.policies import SpeculativePolicy


def _shared_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Busy(EarlyExitError):
    """Every row is running and the queue is full (the server answers 429)."""


class _Cancelled:
    """A stopping criterion that ends a completion once its client has gone: the row is freed at the next token."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        return torch.tensor([self.event.is_set()])


@dataclass
class Job:
    """One prompt to complete, already tokenized and checked (`prepare_prompt`), and where its events go.

    `emit(kind, data)` is called from the worker thread: ("text", {"text": delta}) as text becomes final, then once
    ("done", {"completion": Completion, "retracted": chars}) or ("error", {"message": str})."""

    ids: list[int]
    healed: str
    truncated: list[int]
    settings: GenerationSettings
    policy: object
    emit: Callable[[str, dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def settled_text(text: str, stop_strings) -> str:
    """The part of `text` that no later token can take back: without a trailing partial character (the tokenizer
    writes U+FFFD for a character whose bytes are not all written) or a tail that could begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return text[:end - hold]


class StreamingTranscript(Transcript):
    """A `Transcript` that sends each piece of text as soon as it is settled."""

    def __init__(self, *args, emit: Callable[[str, dict], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.emit, self.sent = emit, ""

    def write(self, token: int, layers: int, scores: torch.Tensor | None = None) -> str | None:
        reason = super().write(token, layers, scores)
        if reason is None:
            self._send(settled_text(self.decoded(), self.settings.stop_strings))
        return reason

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit("text", {"text": text[len(self.sent):]})
            self.sent = text

    def finish(self) -> int:
        """Send the rest of the final text; how many characters already sent it no longer holds (a repetition cut)."""
        final = self.final_text()
        self._send(final)
        return 0 if final.startswith(self.sent) else len(self.sent) - len(final)


@dataclass
class _Row:
    job: Job
    slot: int
    transcript: StreamingTranscript
    prefill_ms: float
    token_ms: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class Engine:
    """The worker thread and its rows. `submit` from any thread; `close` to stop."""

    def __init__(self, model: GPT2, tokenizer, max_rows: int = 8, max_queue: int = 32, prompt_cache_min: int = 0):
        for name, value, low in (("max_rows", max_rows, 1), ("max_queue", max_queue, 0), ("prompt_cache_min", prompt_cache_min, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4096:
                raise EarlyExitError(f"{name} must be an integer in [{low}, 4096], got {value!r}")
        self.prompt_cache_min = prompt_cache_min
        self.prefilled: dict[int, list[int]] = {}  # per row, the prompt ids whose K/V a prefill left there
        self.reused_tokens = 0  # prompt tokens not prefilled again thanks to the prompt cache
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_queue = max_rows, max_queue
        self.cache = model.new_cache(batch=max_rows, capacity=model.dims.n_positions)
        self.free = list(range(max_rows - 1, -1, -1))  # pop() takes row 0 first
        self.rows: dict[int, _Row] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0  # batch steps taken, and the rows they carried: the mean batch size explains throughput
        self.row_steps = 0
        self.cancelled = 0  # rows ended because their client went away
        self.thread = threading.Thread(target=self._run, name="earlyexit-engine", daemon=True)
        self.thread.start()

    # -- any thread --------------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`; `Busy` when every row runs and `max_queue` jobs already wait."""
        with self.cond:
            if self.closed:
                raise EarlyExitError("the engine is shut down")
            if len(self.waiting) >= self.max_queue + len(self.free):  # waiting jobs take the free rows first
                raise Busy(f"the server is busy: {len(self.rows)} of {self.max_rows} rows running and "
                           f"{len(self.waiting)} of {self.max_queue} requests waiting; try again shortly")
            self.waiting.append(job)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "max_rows": self.max_rows, "max_queue": self.max_queue,
                    "cancelled": self.cancelled, "reused_tokens": self.reused_tokens, "steps": self.steps,
                    "mean_batch": self.row_steps / self.steps if self.steps else 0.0}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in self.waiting:
                job.emit("error", {"message": "the server shut down before this request ran"})
            self.waiting.clear()
            self.cond.notify()
        self.thread.join(timeout=30)

    # -- the worker thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.closed and not self.waiting and not self.rows:
                        self.cond.wait()
                    if self.closed:
                        return
                    admitted = []
                    while self.waiting and self.free:
                        job = self.waiting.popleft()
                        slot = self._best_row(job.ids)
                        self.free.remove(slot)
                        admitted.append((job, slot))
                for job, slot in admitted:
                    self._guarded(job, slot, self._start, job, slot)
                if self.rows:
                    self._step()

    def _guarded(self, job: Job, slot: int, fn, *args) -> None:
        """Run fn(*args) for one request; whatever goes wrong ends that request with an error, not the engine."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            self.rows.pop(slot, None)
            self._release(slot)
            message = str(e) if isinstance(e, EarlyExitError) else f"internal error: {type(e).__name__}: {e}"
            if not isinstance(e, EarlyExitError):
                traceback.print_exc()
            job.emit("error", {"message": message})

    def _best_row(self, ids: list[int]) -> int:
        """The free row whose prefilled prompt shares the longest prefix with `ids` (the next free row when none
        shares `prompt_cache_min` tokens, or the cache is off). Called with the lock held."""
        best, best_len = self.free[-1], 0
        if self.prompt_cache_min:
            for slot in self.free:
                shared = _shared_prefix(self.prefilled.get(slot, ()), ids)
                if shared > best_len:
                    best, best_len = slot, shared
        return best

    def _release(self, slot: int) -> None:
        with self.cond:
            if slot not in self.free:
                self.free.append(slot)

    def _start(self, job: Job, slot: int) -> None:
        """Prefill `job` into row `slot` and write its first token (a speculative job: its whole completion)."""
        model = self.model
        view = self.cache.row(slot)
        transcript = StreamingTranscript(self.tokenizer, job.settings, torch.tensor([job.ids], device=model.device),
                                         _Cancelled(job.cancelled), job.healed, job.truncated, emit=job.emit)
        reuse = 0
        if self.prompt_cache_min:  # positions below `reuse` hold this prompt's K/V from an earlier prefill
            reuse = min(_shared_prefix(self.prefilled.get(slot, ()), job.ids), len(job.ids) - 1)
            reuse = reuse if reuse >= self.prompt_cache_min else 0
        self.prefilled.pop(slot, None)  # overwritten from here on, whatever happens
        t0 = time.perf_counter()
        result = job.policy.prefill(model, transcript.input_ids[:, reuse:], view, start=reuse)
        self.prefilled[slot] = list(job.ids)
        self.reused_tokens += reuse
        row = _Row(job, slot, transcript, prefill_ms=(time.perf_counter() - t0) * 1e3)
        if job.cancelled.is_set():
            return self._finish(row, "stopping_criteria")
        if result.stop:
            return self._finish(row, "stop")
        if isinstance(job.policy, SpeculativePolicy):
            reason, row.token_ms, row.stats = job.policy.run(model, view, transcript, transcript.constrain(result.logits))
            return self._finish(row, reason)
        reason = transcript.write_next(result.logits, result.layers, result.stop)
        if reason is not None:
            return self._finish(row, reason)
        self.rows[slot] = row

    def _step(self) -> None:
        """Every running row one token further: one batched step per policy, a lone row on its single-token path."""
        groups: dict[int, list[_Row]] = collections.defaultdict(list)
        for row in self.rows.values():
            groups[id(row.job.policy)].append(row)
        for rows in groups.values():
            policy, model = rows[0].job.policy, self.model
            t0 = time.perf_counter()
            try:
                if len(rows) == 1:
                    r, t = rows[0], rows[0].transcript
                    step = policy.step(model, t.input_ids[:, -1:], self.cache.row(r.slot), t.position, t.layers[-1])
                    results = [(step.logits, step.layers, step.stop)]
                else:
                    dev = model.device
                    step = policy.step_batch(
                        model, torch.tensor([[r.transcript.new[-1]] for r in rows], device=dev), self.cache,
                        torch.tensor([r.transcript.position for r in rows], device=dev),
                        torch.tensor([r.transcript.layers[-1] for r in rows], device=dev),
                        torch.tensor([r.slot for r in rows], device=dev))
                    results = [(step.logits[i:i + 1], step.layers[i], bool(step.stop[i])) for i in range(len(rows))]
            except Exception:  # noqa: BLE001 - a failed step ends its rows, never the engine
                for r in rows:
                    self._guarded(r.job, r.slot, self._raise_for, r)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with self.cond:
                self.steps += 1
                self.row_steps += len(rows)
            for r, (logits, layers, stopped) in zip(rows, results):
                self._guarded(r.job, r.slot, self._write, r, logits, layers, stopped, ms)

    @staticmethod
    def _raise_for(row: _Row) -> None:
        raise EarlyExitError("internal error: the decode step of this request's batch failed")

    def _write(self, row: _Row, logits, layers: int, stopped: bool, ms: float) -> None:
        reason = row.transcript.write_next(logits, layers, stopped)
        if reason != "stop":
            row.token_ms.append(ms)
        if reason is not None:
            self.rows.pop(row.slot, None)
            self._finish(row, reason)

    def _finish(self, row: _Row, reason: str) -> None:
        t = row.transcript
        retracted = t.finish()
        completion = Completion(
            text=t.final_text(), token_ids=t.new, prompt_tokens=len(row.job.ids), finish_reason=reason, exit_layers=t.layers,
            prefill_ms=row.prefill_ms, token_ms=per_kept_token(row.token_ms, len(t.new)),
            prompt_truncated_tokens=len(row.job.truncated), speculation=row.stats, healed_prefix=row.job.healed)
        if reason == "stopping_criteria" and row.job.cancelled.is_set():
            with self.cond:
                self.cancelled += 1
        self._release(row.slot)
        row.job.emit("done", {"completion": completion, "retracted": retracted})
