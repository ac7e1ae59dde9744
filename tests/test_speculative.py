"""Lossless mode equals full greedy token for token: a property over random tiny models."""

import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.heads import EXIT, ExitHeads
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf


def random_heads(model, seed):
    """Heads whose decisions are random but decisive: drafts are often wrong, which is the hard case."""
    heads = ExitHeads.for_backbone(model, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        heads.layer_bias[:, EXIT] += 1.0
    return heads


@pytest.mark.parametrize("draft", ["same", "int8"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_lossless_equals_full_greedy(tiny_tokenizer, seed, k, draft):
    g = torch.Generator().manual_seed(100 + seed)
    n_layer = [2, 3, 5][seed % 3]
    n_embd = [48, 40][seed % 2]  # 40: the int8 draft's unfused fallback (earlyexit.runtime.quantize)
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=n_layer, n_embd=n_embd, seed=seed, eos=tiny_tokenizer.eos_token_id))
    prompt = torch.randint(1, len(tiny_tokenizer), (1 + 7 * seed % 23,), generator=g).tolist()  # odd lengths
    settings = GenerationSettings(max_new_tokens=25 + seed)
    full = complete(model, tiny_tokenizer, prompt, settings)
    # seeds 0-2 draft with exits, 3-5 at full depth (an int8 draft of width 48 then takes earlyexit.runtime.lean_step's lean path)
    lossless = Lossless(model, random_heads(model, seed), exit_threshold=0.3 if seed < 3 else 1.0, max_draft=k,
                        adaptive=seed % 2 == 0, draft=draft)
    assert (lossless.lean is not None) == (draft == "int8" and n_embd == 48 and seed >= 3)
    got = complete(model, tiny_tokenizer, prompt, settings, policy=lossless)
    assert got.token_ids == full.token_ids and got.finish_reason == full.finish_reason
    s = got.speculation
    assert s["draft"] == draft
    assert s["drafted"] >= s["accepted"] >= 0 and s["rounds"] >= 1
    assert len(got.exit_layers) == len(got.token_ids) and len(got.token_ms) == len(got.token_ids) - 1


def test_a_perfect_drafter_is_accepted_whole(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, seed=4))
    heads = ExitHeads.for_backbone(model, rank=0)  # never exits: drafts are full-depth, hence always right
    got = complete(model, tiny_tokenizer, "def add(", GenerationSettings(max_new_tokens=17),
                   policy=Lossless(model, heads, 1.0, max_draft=4, draft="same"))
    full = complete(model, tiny_tokenizer, "def add(", GenerationSettings(max_new_tokens=17))
    assert got.token_ids == full.token_ids
    # the first token comes from the prefill; then rounds of 4 accepted drafts + 1 bonus: 5 + 5 + 5 + the last one
    assert got.speculation["acceptance_rate"] == 1.0 and got.speculation["rounds"] == 4


def test_lossless_refuses_logits_processors_and_bad_draft_lengths(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=1))
    heads = ExitHeads.for_backbone(model, rank=0)
    with pytest.raises(EarlyExitError, match="max_draft"):
        Lossless(model, heads, max_draft=0)
    with pytest.raises(EarlyExitError, match="draft must be one of"):
        Lossless(model, heads, draft="fp8")
    with pytest.raises(EarlyExitError, match="fp32 model"):
        Lossless(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=1), dtype=torch.float64), heads, draft="int8")
    with pytest.raises(EarlyExitError, match="logits processors"):
        complete(model, tiny_tokenizer, "x", policy=Lossless(model, heads), logits_processor=lambda ids, s: s)


def test_lossless_with_a_stop_threshold_stops_where_early_exit_without_exits_does(tiny_tokenizer):
    """With stop_threshold s, lossless writes EarlyExit(exit=1, stop=s)'s tokens: full's greedy tokens, cut where the
    controller stops (at the prefill, or after any token: each round checks every position it writes from)."""
    from earlyexit.runtime.heads import STOP, Thresholds
    from earlyexit.runtime.policies import EarlyExit

    reasons, lengths = [], []
    for seed in range(8):
        g = torch.Generator().manual_seed(200 + seed)
        model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=[2, 3, 4][seed % 3], n_embd=48, seed=seed, eos=tiny_tokenizer.eos_token_id))
        heads = random_heads(model, seed)
        with torch.no_grad():
            heads.layer_bias[:, STOP] += 0.5  # stops now and then, after a few tokens or at once
        prompt = torch.randint(1, len(tiny_tokenizer), (2 + 5 * seed % 17,), generator=g).tolist()
        settings = GenerationSettings(max_new_tokens=30)
        stop = 0.45
        reference = complete(model, tiny_tokenizer, prompt, settings, policy=EarlyExit(model, heads, Thresholds(exit=1.0, stop=stop)))
        full = complete(model, tiny_tokenizer, prompt, settings)
        for draft, exit_threshold in [("same", 0.3), ("int8", 1.0)]:
            policy = Lossless(model, heads, exit_threshold, max_draft=1 + seed % 5, adaptive=seed % 2 == 0, draft=draft, stop_threshold=stop)
            got = complete(model, tiny_tokenizer, prompt, settings, policy=policy)
            assert (got.token_ids, got.finish_reason) == (reference.token_ids, reference.finish_reason), (seed, draft)
            assert got.token_ids == full.token_ids[:len(got.token_ids)]
            assert len(got.token_ms) == max(0, len(got.token_ids) - 1)
        reasons.append(reference.finish_reason)
        lengths.append(len(reference.token_ids))
    stopped = [n for r, n in zip(reasons, lengths) if r == "stop"]
    assert any(n > 1 for n in stopped), (reasons, lengths)  # stops that came mid-way, after several rounds' tokens
    assert len(stopped) < len(reasons), (reasons, lengths)  # and completions the controller let run


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("draft", ["int8", "same"])
def test_drafts_end_where_they_complete_a_stop_string_and_the_output_is_full_modes(tiny_tokenizer, seed, draft):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=64, seed=seed)).eval()
    prompt, n = "def add(a, b):\n    return a", 40
    free = complete(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=n))
    text = free.text
    # a stop string the free completion only completes half-way through: the drafts reach it in a later round
    stop = text[:len(text) // 2]
    if len(free.token_ids) < 12 or not stop:
        pytest.skip("the tiny model wrote too little to stop in")
    settings = GenerationSettings(max_new_tokens=n, stop_strings=[stop])
    full = complete(model, tiny_tokenizer, prompt, settings)
    policy = Lossless(model, random_heads(model, seed), max_draft=8, draft=draft, adaptive=False)
    calls = []
    original = policy.draft

    def spy(model_, cache, transcript, pos, k, eos):
        drafts, layers = original(model_, cache, transcript, pos, k, eos)
        calls.append([transcript.stops_after(drafts[:i]) for i in range(1, len(drafts))])
        return drafts, layers

    policy.draft = spy
    got = complete(model, tiny_tokenizer, prompt, settings, policy=policy)
    assert got.token_ids == full.token_ids and got.text == full.text and got.finish_reason == full.finish_reason == "stop_string"
    assert calls and not any(any(prefix_stops) for prefix_stops in calls)  # no draft went on past a completed stop string
