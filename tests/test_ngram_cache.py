"""The n-gram cache: what it counts, how it blends, and that the runtime's cache is the logits processor's."""

import pytest
import torch

from earlyexit.runtime.batch import complete_batch
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.heads import ExitHeads, Thresholds
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.ngram_cache import NGramCacheLogitsProcessor, blend, continuations
from earlyexit.runtime.policies import EarlyExit
from earlyexit.runtime.speculative import Lossless

NEG = float("-inf")


def ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


@pytest.mark.parametrize("sequence, max_order, followers", [
    ((5, 6, 7, 9, 1, 7, 3, 5, 6, 7), 8, [9]),  # the longest match (5 6 7) wins over the shorter (7 -> 3)
    ((5, 6, 7, 9, 1, 7, 3, 5, 6, 7), 1, [9, 3]),  # order 1: every earlier 7
    ((1, 2, 1, 2, 1, 2), 8, [1]),  # overlapping earlier copies: 1 2 1 2 is followed by 1
    ((4, 4, 4), 8, [4]),
    ((1, 2, 3), 8, []),  # the last token is new
    ((7,), 8, []),
    ((), 8, []),
])
def test_continuations_follow_the_longest_earlier_match(sequence, max_order, followers):
    assert sorted(continuations(ids(*sequence), max_order).tolist()) == sorted(followers)


def test_continuations_count_every_earlier_occurrence():
    assert sorted(continuations(ids(3, 8, 3, 8, 3, 9, 3)).tolist()) == [8, 8, 9]


def test_recent_occurrences_are_not_searched():
    sequence = ids(5, 6, 1, 2, 7, 5, 6, 3, 5, 6)  # 5 6 -> 1 far back, 5 6 -> 3 recent
    assert sorted(continuations(sequence).tolist()) == [1, 3]
    assert sorted(continuations(sequence, skip_recent=2).tolist()) == [1, 3]  # the follower 3 is not among the last 2
    assert continuations(sequence, skip_recent=3).tolist() == [1]  # it is among the last 3
    assert continuations(sequence, skip_recent=7).tolist() == [1]
    assert continuations(sequence, skip_recent=8).tolist() == []  # the follower 1 is among the last 8


def test_blend_mixes_probabilities_and_keeps_masks():
    scores = torch.tensor([2.0, 1.0, 0.0, NEG])
    mixed = blend(scores, ids(2, 2, 3), 0.5)
    p = torch.softmax(scores, -1)
    expected = 0.5 * p + 0.5 * torch.tensor([0.0, 0.0, 2 / 3, 0.0])
    assert torch.allclose(mixed[:3].exp(), expected[:3])
    assert mixed[3] == NEG  # token 3 followed once, but another rule masked it
    assert int(blend(scores, ids(2), 0.9).argmax()) == 2
    assert torch.equal(blend(scores, ids(2), 0.0), scores) and torch.equal(blend(scores, ids(), 0.7), scores)


def test_processor_searches_each_row_after_the_context():
    scores = torch.zeros(2, 10)
    processor = NGramCacheLogitsProcessor(weight=0.8, skip_recent=0, context=[4, 5, 9])
    out = processor(ids(1, 2, 1).view(1, 3).repeat(2, 1), scores)
    assert out.argmax(-1).tolist() == [2, 2]  # 1 was followed by 2 in the row itself
    out = processor(torch.tensor([[3, 4], [0, 6]]), scores)
    assert out[0].argmax() == 5  # 4 was followed by 5 in the context only
    assert torch.equal(out[1], scores[1])  # 6 never occurred before: left alone
    assert torch.equal(NGramCacheLogitsProcessor(weight=0.0)(torch.tensor([[1, 1]]), scores[:1]), scores[:1])
    assert torch.equal(NGramCacheLogitsProcessor(weight=0.8, skip_recent=2)(ids(1, 2, 1).view(1, 3), scores[:1]), scores[:1])


@pytest.mark.parametrize("kwargs", [{"weight": -0.1}, {"weight": 1.5}, {"weight": "0.3"}, {"weight": True}, {"max_order": 0},
                                    {"skip_recent": -1}, {"skip_recent": 1.5}])
def test_bad_settings_are_named(kwargs):
    with pytest.raises(EarlyExitError, match="n-gram cache"):
        NGramCacheLogitsProcessor(**kwargs)


def test_settings_reject_a_weight_outside_the_unit_interval():
    with pytest.raises(EarlyExitError, match=r"n-gram cache weight must be a number in \[0, 1\], got 2"):
        GenerationSettings(cache_weight=2)
    with pytest.raises(EarlyExitError, match="n-gram cache skip_recent must be a non-negative integer, got -3"):
        GenerationSettings(cache_skip_recent=-3)


REPEATING = "def push(self, item):\n    self.items.append(item)\n\ndef pop(self):\n    return self.items.pop()\n\ndef push(self, it"


@pytest.fixture
def model(tiny_hf):
    return GPT2.from_hf(tiny_hf)


def test_runtime_cache_is_the_processor_over_the_truncated_prompt(model, tiny_tokenizer):
    """The runtime's cache searches the prompt, its left-truncated part first, as the processor with that part as
    context does; alone and batched; and a strong cache changes what the random model writes."""
    prompt = REPEATING * 6  # longer than the tiny model's context: truncated
    settings = GenerationSettings(max_new_tokens=12, truncate_prompt=True, cache_weight=0.6, cache_skip_recent=0)
    with pytest.warns(UserWarning, match="left-truncated"):
        cached = complete(model, tiny_tokenizer, prompt, settings)
    assert cached.prompt_truncated_tokens > 0
    full_ids = tiny_tokenizer.encode(prompt)
    dropped = full_ids[:cached.prompt_truncated_tokens]
    processor = NGramCacheLogitsProcessor(weight=0.6, skip_recent=0, context=dropped)
    plain = GenerationSettings(max_new_tokens=12, truncate_prompt=True)
    with pytest.warns(UserWarning):
        via_processor = complete(model, tiny_tokenizer, prompt, plain, logits_processor=processor)
        without = complete(model, tiny_tokenizer, prompt, plain)
    assert cached.token_ids == via_processor.token_ids != without.token_ids
    with pytest.warns(UserWarning):
        batched = complete_batch(model, tiny_tokenizer, [prompt, REPEATING], settings)
    assert batched[0].token_ids == cached.token_ids
    assert batched[1].token_ids == complete(model, tiny_tokenizer, REPEATING, settings).token_ids


def test_cache_with_healing_and_early_exit_writes_the_backed_off_text_first(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=8, token_healing=True, cache_weight=1.0, cache_skip_recent=0)
    heads = ExitHeads.for_backbone(model, rank=2)
    for policy in (None, EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0))):
        c = complete(model, tiny_tokenizer, REPEATING, settings, policy=policy)
        assert c.healed_prefix and tiny_tokenizer.decode(c.token_ids).startswith(c.healed_prefix)
        assert c.text.startswith("em):\n")  # weight 1: the cache copies the line written before
    # skipping the last tokens, it does not copy the line just written: with the prompt inside them, nothing changes
    plain = complete(model, tiny_tokenizer, REPEATING, GenerationSettings(max_new_tokens=8, token_healing=True))
    skipped = GenerationSettings(max_new_tokens=8, token_healing=True, cache_weight=1.0, cache_skip_recent=len(tiny_tokenizer.encode(REPEATING)))
    assert complete(model, tiny_tokenizer, REPEATING, skipped).token_ids == plain.token_ids


@pytest.mark.parametrize("draft", ["same", "int8"])
def test_lossless_with_the_cache_writes_full_modes_cached_tokens(model, tiny_tokenizer, draft):
    """The verify pass applies the cache at every drafted position as full mode does after those tokens: the same
    tokens, alone and batched, with healing and with truncation, while the drafts themselves ignore the cache."""
    heads = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        heads.layer_bias[:, 1] = 5.0  # drafts exit early, often wrongly: rejections happen
    prompts = [REPEATING, REPEATING * 6, "class Stack:\n    def pu", "def f():\n    ret"]
    settings = GenerationSettings(max_new_tokens=14, token_healing=True, truncate_prompt=True, cache_weight=0.6, cache_skip_recent=4)
    with pytest.warns(UserWarning):
        full = [complete(model, tiny_tokenizer, p, settings) for p in prompts]
        lossless = Lossless(model, heads, exit_threshold=0.2, max_draft=4, draft=draft)
        alone = [complete(model, tiny_tokenizer, p, settings, policy=lossless) for p in prompts]
        together = complete_batch(model, tiny_tokenizer, prompts, settings, policy=lossless)
    without = [complete(model, tiny_tokenizer, p, GenerationSettings(max_new_tokens=14, token_healing=True)) for p in prompts[:1]]
    assert full[0].token_ids != without[0].token_ids  # the cache changes what is written
    assert [c.token_ids for c in alone] == [c.token_ids for c in full] == [c.token_ids for c in together]
    assert sum(c.speculation["drafted"] - c.speculation["accepted"] for c in alone) > 0  # some drafts were rejected
