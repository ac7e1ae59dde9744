"""Sampling (temperature, top-p, seed): greedy at 0, the right distribution above it, reproducible by seed, refused
where it cannot be honoured (lossless mode), and the same per row of a batch as alone."""

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.batch import complete_batch
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.sampling import Sampler, check_sampling
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf
from test_batch import random_heads


def test_temperature_zero_is_the_argmax():
    scores = torch.randn(1, 97)
    assert Sampler()(scores) == int(scores.argmax())
    assert Sampler(0.0, top_p=0.3, seed=5)(scores) == int(scores.argmax())


def test_draws_follow_the_softmax_at_the_temperature():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(temperature=0.7, seed=0)
    n = 20_000
    counts = torch.bincount(torch.tensor([sampler(scores) for _ in range(n)]), minlength=4).float() / n
    expected = torch.softmax(scores[0] / 0.7, -1)
    assert torch.allclose(counts, expected, atol=0.015), (counts, expected)


def test_top_p_keeps_the_smallest_nucleus_and_always_the_top_token():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampler(1.0, top_p=0.75, seed=0).probabilities(scores)
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    probs = Sampler(1.0, top_p=0.01, seed=0).probabilities(scores)
    assert torch.equal(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_a_seed_draws_the_same_tokens_again_and_another_seed_others():
    scores = torch.zeros(1, 1000)
    first = Sampler(1.0, seed=7)(scores)
    a, b, c = Sampler(1.0, seed=7), Sampler(1.0, seed=7), Sampler(1.0, seed=8)
    draws_a, draws_b, draws_c = ([s(scores) for _ in range(20)] for s in (a, b, c))
    assert draws_a == draws_b and draws_a[0] == first
    assert draws_a != draws_c


@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 500), st.booleans(), st.text(max_size=3)),
       top_p=st.one_of(st.floats(allow_nan=True), st.integers(-2, 3), st.none()),
       seed=st.one_of(st.none(), st.integers(-3, 2**64), st.floats(), st.booleans()))
@hsettings(max_examples=300, deadline=None)
def test_check_sampling_takes_exactly_the_valid_values(temperature, top_p, seed):
    def number(x):
        return not isinstance(x, bool) and isinstance(x, (int, float)) and x == x and abs(x) != float("inf")

    valid = (number(temperature) and 0 <= temperature <= 100 and number(top_p) and 0 < top_p <= 1
             and (seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63)))
    if valid:
        check_sampling(temperature, top_p, seed)
    else:
        with pytest.raises(EarlyExitError):
            check_sampling(temperature, top_p, seed)


@pytest.fixture
def tiny(tiny_tokenizer):
    return GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), seed=3, n_layer=3, n_positions=128))


def test_sampled_completions_repeat_by_seed_and_differ_from_greedy(tiny, tiny_tokenizer):
    def run(seed):
        s = GenerationSettings(max_new_tokens=24, temperature=1.5, seed=seed)
        return complete(tiny, tiny_tokenizer, "def add(a, b):", s).token_ids

    greedy = complete(tiny, tiny_tokenizer, "def add(a, b):", GenerationSettings(max_new_tokens=24)).token_ids
    assert run(1) == run(1)
    assert len({tuple(run(seed)) for seed in range(4)} | {tuple(greedy)}) > 2


def test_a_batch_row_draws_what_the_prompt_draws_alone(tiny, tiny_tokenizer):
    s = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    prompts = ["def add(a, b):", "for i in", "import os\n"]
    together = complete_batch(tiny, tiny_tokenizer, prompts, s)
    for prompt, row in zip(prompts, together):
        assert complete(tiny, tiny_tokenizer, prompt, s).token_ids == row.token_ids


def test_lossless_refuses_to_sample(tiny, tiny_tokenizer):
    policy = Lossless(tiny, random_heads(tiny, 0), draft="same")
    with pytest.raises(EarlyExitError, match="does not sample"):
        complete(tiny, tiny_tokenizer, "x = 1", GenerationSettings(temperature=0.5), policy=policy)
    with pytest.raises(EarlyExitError, match="does not sample"):
        complete_batch(tiny, tiny_tokenizer, ["x = 1"], GenerationSettings(temperature=0.5), policy=policy)
