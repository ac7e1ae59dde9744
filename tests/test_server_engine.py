"""The server's engine without HTTP: rows that join and leave a running batch write what `complete` writes alone,
stream exactly their final text, free their rows when cancelled, and refuse work past the queue."""

import threading

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from earlyexit.runtime.decoding import GenerationSettings, complete, prepare_prompt
from earlyexit.runtime.heads import Thresholds
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit, FullDepth
from earlyexit.server.engine import Busy, Engine, Job, settled_text

from conftest import make_tiny_hf
from test_batch import PROMPTS, random_heads


class Collector:
    """A job's events, and a way to wait for its end."""

    def __init__(self):
        self.texts, self.done, self.error, self.finished = [], None, None, threading.Event()

    def __call__(self, kind, data):
        if kind == "text":
            self.texts.append(data["text"])
        else:
            self.done, self.error = (data, None) if kind == "done" else (None, data["message"])
            self.finished.set()


def submit(engine, model, tok, prompt, settings, policy):
    ids, healed, truncated = prepare_prompt(tok, model, prompt, settings)
    out = Collector()
    job = Job(ids, healed, list(truncated), settings, policy, out)
    engine.submit(job)
    return job, out


@pytest.fixture
def tiny(tiny_tokenizer):
    hf = make_tiny_hf(len(tiny_tokenizer), seed=5, n_layer=4, n_positions=128)
    with torch.no_grad():  # peaked logits, as test_batch's: float-order ties between batch shapes stay improbable
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() >= 2 else None
    return GPT2.from_hf(hf)


@pytest.mark.parametrize("mode", ["full", "early-exit"])
def test_rows_joining_a_running_batch_write_what_each_prompt_writes_alone(tiny, tiny_tokenizer, mode):
    policy = FullDepth() if mode == "full" else EarlyExit(tiny, random_heads(tiny, 1), Thresholds(exit=0.6, stop=0.9))
    settings = GenerationSettings(max_new_tokens=20, stop_strings=("\n\n",), stop_on_repetition=True, cache_weight=0.3)
    engine = Engine(tiny, tiny_tokenizer, max_rows=3, max_queue=8)
    try:
        runs = [submit(engine, tiny, tiny_tokenizer, p, settings, policy) for p in PROMPTS * 2]  # more prompts than rows
        for _, out in runs:
            assert out.finished.wait(60) and out.error is None
    finally:
        engine.close()
    for prompt, (_, out) in zip(PROMPTS * 2, runs):
        alone = complete(tiny, tiny_tokenizer, prompt, settings, policy=policy)
        got = out.done["completion"]
        assert (got.token_ids, got.exit_layers, got.finish_reason, got.text) == (alone.token_ids, alone.exit_layers, alone.finish_reason, alone.text)
        if not out.done["retracted"]:
            assert "".join(out.texts) == got.text  # the stream is the final text, piece by piece
    assert engine.load()["mean_batch"] > 1  # rows did step together


def test_sampled_rows_draw_what_they_draw_alone(tiny, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, seed=4)
    engine = Engine(tiny, tiny_tokenizer, max_rows=4)
    try:
        runs = [submit(engine, tiny, tiny_tokenizer, p, settings, FullDepth()) for p in PROMPTS]
        for _, out in runs:
            assert out.finished.wait(60)
    finally:
        engine.close()
    for prompt, (_, out) in zip(PROMPTS, runs):
        assert out.done["completion"].token_ids == complete(tiny, tiny_tokenizer, prompt, settings).token_ids


def test_a_cancelled_row_is_freed_and_a_full_queue_refuses(tiny, tiny_tokenizer):
    long = GenerationSettings(max_new_tokens=100)
    engine = Engine(tiny, tiny_tokenizer, max_rows=1, max_queue=1)
    try:
        first, first_out = submit(engine, tiny, tiny_tokenizer, "def add(a, b):", long, FullDepth())
        second, second_out = submit(engine, tiny, tiny_tokenizer, "for i in", long, FullDepth())
        with pytest.raises(Busy, match="busy"):
            submit(engine, tiny, tiny_tokenizer, "import os", long, FullDepth())
        first.cancel()
        second.cancel()
        assert first_out.finished.wait(60) and second_out.finished.wait(60)
        assert engine.load()["cancelled"] == 2 and engine.load()["running"] == 0
        _, out = submit(engine, tiny, tiny_tokenizer, "import os", GenerationSettings(max_new_tokens=3), FullDepth())
        assert out.finished.wait(60) and len(out.done["completion"].token_ids) <= 3
    finally:
        engine.close()


def test_a_failing_request_ends_with_an_error_and_the_engine_goes_on(tiny, tiny_tokenizer):
    class Broken(FullDepth):
        def prefill(self, model, ids, cache, start=0):
            raise RuntimeError("boom")

    engine = Engine(tiny, tiny_tokenizer, max_rows=2)
    try:
        _, bad = submit(engine, tiny, tiny_tokenizer, "x = 1", GenerationSettings(max_new_tokens=4), Broken())
        _, good = submit(engine, tiny, tiny_tokenizer, "x = 1", GenerationSettings(max_new_tokens=4), FullDepth())
        assert bad.finished.wait(60) and "boom" in bad.error
        assert good.finished.wait(60) and good.error is None
    finally:
        engine.close()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", 10**6])
def test_engine_sizes_are_checked(tiny, tiny_tokenizer, bad):
    with pytest.raises(Exception, match="max_rows"):
        Engine(tiny, tiny_tokenizer, max_rows=bad)


@given(text=st.text(alphabet="ab\n\ufffd", max_size=12), stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3))
@hsettings(max_examples=300, deadline=None)
def test_settled_text_holds_back_only_what_a_later_token_could_change(text, stops):
    settled = settled_text(text, stops)
    assert text.startswith(settled)
    held = text[len(settled):]
    if held:  # held back: a partial character at the end, or a tail that begins a stop string
        stripped = held.rstrip("\ufffd")
        assert stripped != held or any(s.startswith(stripped) and len(stripped) < len(s) for s in stops)
    # nothing held back that could not matter: settled text plus any continuation never needs it withdrawn
    for s in stops:
        for k in range(1, len(s)):
            if (text.rstrip("\ufffd")).endswith(s[:k]):
                assert len(held.rstrip("\ufffd")) >= k or held.endswith("\ufffd")


@pytest.mark.parametrize("mode", ["full", "early-exit"])
def test_a_prompt_that_extends_an_earlier_one_reuses_its_rows_prefill_and_writes_the_same(tiny, tiny_tokenizer, mode):
    policy = FullDepth() if mode == "full" else EarlyExit(tiny, random_heads(tiny, 1), Thresholds(exit=0.6, stop=0.9))
    settings = GenerationSettings(max_new_tokens=12)
    base = PROMPTS[1]  # a class with a method: the editor's file above the cursor
    typed = [base, base + "    def push(self, item):\n", base + "    def push(self, item):\n        self.items.append("]
    engine = Engine(tiny, tiny_tokenizer, max_rows=2, prompt_cache_min=4)
    try:
        for prompt in typed:  # one after another, as an editor sends them
            _, out = submit(engine, tiny, tiny_tokenizer, prompt, settings, policy)
            assert out.finished.wait(60) and out.error is None
            alone = complete(tiny, tiny_tokenizer, prompt, settings, policy=policy)
            got = out.done["completion"]
            assert (got.token_ids, got.exit_layers) == (alone.token_ids, alone.exit_layers)
        reused = engine.load()["reused_tokens"]
    finally:
        engine.close()
    shared = [len(prepare_prompt(tiny_tokenizer, tiny, p, settings)[0]) for p in typed[:2]]
    assert reused >= sum(shared) - 2  # the second and third prompts took (nearly all of) the earlier prompt's positions


def test_the_prompt_cache_off_reuses_nothing(tiny, tiny_tokenizer):
    engine = Engine(tiny, tiny_tokenizer, max_rows=1, prompt_cache_min=0)
    try:
        for prompt in (PROMPTS[1], PROMPTS[1] + "    pass\n"):
            _, out = submit(engine, tiny, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=4), FullDepth())
            assert out.finished.wait(60)
        assert engine.load()["reused_tokens"] == 0
    finally:
        engine.close()
