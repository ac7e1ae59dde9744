"""Drafts from the model's own first E layers (LayerSkip's self-speculation): lossless mode stays exactly full's
tokens, on the native step the verification starts at block E over the drafts' own streams, and the first layers
alone are a policy of their own."""

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from earlyexit.errors import EarlyExitError
from earlyexit.runtime import native
from earlyexit.runtime.batch import complete_batch
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.first_layers import FirstLayers
from earlyexit.runtime.lean_step import attach_lean_step
from earlyexit.runtime.model import GPT2, KVCache
from earlyexit.runtime.quantize import quantize_int8
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf
from test_batch import PROMPTS
from test_native_controller import spy
from test_speculative import random_heads

needs_native = pytest.mark.skipif(native.extension() is None, reason="the native step is not built here")


def tiny(tok, seed: int, n_layer: int = 4, n_embd: int = 48) -> GPT2:
    return GPT2.from_hf(make_tiny_hf(len(tok), n_layer=n_layer, n_embd=n_embd, seed=seed, eos=tok.eos_token_id)).eval()


@needs_native
@hsettings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n_layer=st.integers(2, 5), first=st.integers(1, 4), max_draft=st.integers(1, 6),
       new=st.integers(1, 24))
def test_lossless_with_first_layer_drafts_is_exactly_full_on_the_native_step(tiny_tokenizer, seed, n_layer, first, max_draft, new):
    first = min(first, n_layer - 1)
    model = attach_lean_step(tiny(tiny_tokenizer, seed, n_layer))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, len(tiny_tokenizer), (1 + seed % 13,), generator=g).tolist()
    settings = GenerationSettings(max_new_tokens=new)
    full = complete(model, tiny_tokenizer, prompt, settings)
    policy = Lossless(model, random_heads(model, seed), draft_layers=first, max_draft=max_draft)
    calls = []
    spy(model.lean, "window_from", calls)
    spy(model.lean, "window", calls)
    got = complete(model, tiny_tokenizer, prompt, settings, policy=policy)
    assert got.token_ids == full.token_ids
    assert got.speculation["draft"] == f"first {first} layers" and got.speculation["drafted"] >= got.speculation["accepted"]
    assert calls == ["window_from"] * got.speculation["rounds"]  # every round verified from block E, none through every block


@needs_native
def test_a_first_round_verifies_from_block_e_though_nothing_has_used_the_native_step_yet(tiny_tokenizer):
    """The C++ step is built on first use: the first draft asks for it (`built`) rather than finding it absent."""
    model = attach_lean_step(tiny(tiny_tokenizer, 3))
    assert model.lean.native is None  # not built until asked
    calls = []
    spy(model.lean, "window_from", calls)
    got = complete(model, tiny_tokenizer, "def add(a, b):", GenerationSettings(max_new_tokens=12),
                   policy=Lossless(model, random_heads(model, 3), draft_layers=2, max_draft=4))
    assert got.speculation["rounds"] >= 1 and calls == ["window_from"] * got.speculation["rounds"]


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_lossless_with_first_layer_drafts_is_exactly_full_in_a_batch_and_on_the_torch_path(tiny_tokenizer, lean, seed):
    model = tiny(tiny_tokenizer, seed)
    if lean:
        attach_lean_step(model)
    heads = random_heads(model, seed)
    settings = GenerationSettings(max_new_tokens=16)
    full = [complete(model, tiny_tokenizer, p, settings) for p in PROMPTS]
    policy = Lossless(model, heads, draft_layers=2, max_draft=4)
    alone = [complete(model, tiny_tokenizer, p, settings, policy=policy) for p in PROMPTS]
    batched = complete_batch(model, tiny_tokenizer, PROMPTS, settings, policy=policy)
    for f, a, b in zip(full, alone, batched):
        assert f.token_ids == a.token_ids == b.token_ids
    assert policy.drafter.streams == {}  # nothing kept past its round


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_the_window_from_block_e_gives_the_whole_windows_logits_bit_for_bit(tiny_tokenizer, kind):
    base = tiny(tiny_tokenizer, 5, n_layer=4, n_embd=64)
    model = quantize_int8(base) if kind == "int8" else attach_lean_step(base)
    lean, tokens, pos = model.lean, [5, 17, 3, 99, 42], 3
    whole, part = (KVCache(model.dims, 1, 16, torch.float32) for _ in range(2))
    for cache in (whole, part):
        for i, t in enumerate([7, 8, 9]):
            lean.logits(t, cache, i)
    want = lean.window(tokens, whole, pos)
    streams = torch.cat([lean.blocks(0, 2, lean.embed(t, pos + i), part, pos + i) for i, t in enumerate(tokens)])
    got = lean.window_from(streams, part, pos, 2)
    assert torch.equal(got, want)
    assert torch.equal(part.k, whole.k) and torch.equal(part.v, whole.v)  # every block's K/V the same, bit for bit


def test_the_first_layers_alone_decode_a_model_e_blocks_deep(tiny_tokenizer):
    model = tiny(tiny_tokenizer, 2)
    heads = random_heads(model, 2)
    policy = FirstLayers(model, heads, 2)
    settings = GenerationSettings(max_new_tokens=6)
    got = complete(model, tiny_tokenizer, "def add(a, b):", settings, policy=policy)
    assert set(got.exit_layers) == {2}
    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):") + got.token_ids[:-1]])
    x = model.embed(ids, 0)
    cache = KVCache(model.dims, 1, ids.shape[1], torch.float32)
    for layer in range(2):
        x = model.block(layer, x, cache, 0)
    want = heads.head_logits(1, x[0], model).argmax(-1)[-len(got.token_ids):]
    assert got.token_ids == want.tolist()  # each token the argmax of exit head 1 after blocks 0-1, teacher-forced
    batched = complete_batch(model, tiny_tokenizer, PROMPTS, settings, policy=policy)
    assert [b.token_ids for b in batched] == [complete(model, tiny_tokenizer, p, settings, policy=policy).token_ids for p in PROMPTS]


@pytest.mark.parametrize("value, message", [
    (0, r"draft_layers must be an integer in \[1, 3\]"), (4, r"in \[1, 3\]"), (True, "got True"), ("2", "got '2'"),
])
def test_draft_layers_out_of_range_is_refused_in_one_line(tiny_tokenizer, value, message):
    model = tiny(tiny_tokenizer, 0)
    with pytest.raises(EarlyExitError, match=message):
        Lossless(model, random_heads(model, 0), draft_layers=value)


@pytest.mark.parametrize("other", [{"draft": "int8"}, {"exit_threshold": 0.5}])
def test_draft_layers_with_an_int8_draft_or_an_exit_threshold_is_refused(tiny_tokenizer, other):
    model = tiny(tiny_tokenizer, 0)
    with pytest.raises(EarlyExitError, match="first 2 blocks at a fixed depth: give it without draft='int8' and without an exit"):
        Lossless(model, random_heads(model, 0), draft_layers=2, **other)
