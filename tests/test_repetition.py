"""Loop detection (earlyexit.runtime.repetition) and the completion it ends (stop_on_repetition)."""

import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.heads import ExitHeads
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.repetition import loop_tail
from earlyexit.runtime.speculative import Lossless


def pieces(*texts):
    """Token ids for text pieces, and the decode that maps them back (one id per distinct piece)."""
    vocab = {}
    ids = [vocab.setdefault(t, len(vocab)) for t in texts]
    inverse = {i: t for t, i in vocab.items()}
    return ids, lambda seq: "".join(inverse[i] for i in seq)


BLOCK = ("    if", " n", " <", " 2", ":\n", "        return", " False", "\n")


@pytest.mark.parametrize("texts, drop", [
    (("def f(n):\n", *BLOCK, *BLOCK), len(BLOCK)),                  # a block of lines, twice: cut to one copy
    (("def f(n):\n", *BLOCK), 0),                                   # once: nothing to cut
    (("x", " =", " f", "(", "a", ")\n") * 2, 0),                     # one line twice: may be legitimate
    (("x", " =", " f", "(", "a", ")\n") * 3, 12),                    # three times: a loop
    (("if", " x", ":\n", "    return", " y", "\n", "if") * 3, 15),  # begun mid-copy: cut at a line break
    (("  ", " if", " x", ":", "\n   ", " return", " y", "\n   ", " if", " x", ":", "\n   ", " return", " y", "\n   "), 8),
    (("Returns", " the", *(" list", " of") * 3), 0),                 # a phrase: needs 8 tokens of copies
    (("Returns", " the", *(" list", " of") * 4), 6),
    (("x", " =", " [", "0", *(",", " 0") * 6), 0),                   # data, not a loop: no letters in the cycle
    (("x", " =", " 1", *(")",) * 9), 0),
    (("x", " =", " 1", *("\n",) * 7), 0),                              # blank lines: a loop from eight on
    (("x", " =", " 1", *("\n",) * 8), 7),
    (("np", ".", "add", "(", *("np", ".", "add", ",", " ") * 3), 10),
])
def test_loop_tail(texts, drop):
    ids, decode = pieces(*texts)
    assert loop_tail(ids, decode) == drop
    if drop:  # what stays holds one copy and no longer loops
        assert loop_tail(ids[:-drop], decode) == 0


def test_the_longest_period_looked_at_is_bounded():
    block = (*[f"t{i} " for i in range(15)], "\n", *[f"u{i} " for i in range(15)], "\n")  # two lines of 16 tokens
    ids, decode = pieces(*block, *block)
    assert loop_tail(ids, decode) == 32 and loop_tail(ids, decode, max_period=20) == 0


class ForceCycle:
    """A logits processor that makes greedy decoding write `cycle` over and over."""

    def __init__(self, cycle):
        self.cycle, self.count = cycle, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[..., self.cycle[self.count % len(self.cycle)]] = 0.0
        self.count += 1
        return forced


def test_a_looping_completion_ends_with_one_copy(tiny_hf, tiny_tokenizer):
    model = GPT2.from_hf(tiny_hf)
    cycle = tiny_tokenizer.encode("    if n < 2:\n        return False\n", add_special_tokens=False)
    off = complete(model, tiny_tokenizer, "def f(n):\n", GenerationSettings(max_new_tokens=60), ForceCycle(cycle))
    assert off.finish_reason == "max_tokens" and off.text.count("return False") > 2
    on = complete(model, tiny_tokenizer, "def f(n):\n", GenerationSettings(max_new_tokens=60, stop_on_repetition=True), ForceCycle(cycle))
    assert on.finish_reason == "repetition"
    assert on.token_ids == cycle and len(on.exit_layers) == len(cycle)
    assert len(on.token_ms) == len(cycle) - 1  # the cut tokens' time is charged to the last kept one
    assert on.text == "    if n < 2:\n        return False\n"  # a whole copy: this tokenizer ends a line with "\n"


def test_repetition_stop_is_off_by_default_and_lossless_cuts_the_same(tiny_hf, tiny_tokenizer):
    assert GenerationSettings().stop_on_repetition is False
    model = GPT2.from_hf(tiny_hf)
    heads = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        heads.layer_bias[:, 1] = 5.0  # drafts exit early, often wrongly: verification rejects some
    prompt = "import os\n"
    reasons = set()
    for max_new in (6, 40):
        settings = GenerationSettings(max_new_tokens=max_new, stop_on_repetition=True)
        full = complete(model, tiny_tokenizer, prompt, settings)
        lossless = complete(model, tiny_tokenizer, prompt, settings, policy=Lossless(model, heads, exit_threshold=0.1, draft="same"))
        assert (lossless.token_ids, lossless.finish_reason) == (full.token_ids, full.finish_reason)
        assert len(full.token_ms) == len(lossless.token_ms) == len(full.token_ids) - 1
        reasons.add(full.finish_reason)
        raw = complete(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=max_new))
        assert raw.token_ids[:len(full.token_ids)] == full.token_ids  # the stop only ever cuts greedy's tokens
    assert reasons == {"max_tokens", "repetition"}  # the random model writes blank lines: a loop by 40 tokens, not by 6


def test_batched_completions_cut_loops_as_one_at_a_time(tiny_hf, tiny_tokenizer):
    from earlyexit.runtime.batch import complete_batch

    model = GPT2.from_hf(tiny_hf)
    prompts = ["import os\n", "def add(a, b):\n", "x"]
    settings = GenerationSettings(max_new_tokens=30, stop_on_repetition=True)
    batched = complete_batch(model, tiny_tokenizer, prompts, settings)
    single = [complete(model, tiny_tokenizer, p, settings) for p in prompts]
    assert [(c.token_ids, c.finish_reason) for c in batched] == [(c.token_ids, c.finish_reason) for c in single]
    assert all(len(c.token_ms) == len(c.token_ids) - 1 for c in batched)
    assert "repetition" in {c.finish_reason for c in single}


def test_timings_of_cut_tokens_are_charged_to_the_last_kept_token():
    from earlyexit.runtime.decoding import per_kept_token

    assert per_kept_token([1.0, 2.0, 3.0, 4.0], kept=3) == [1.0, 9.0]
    assert per_kept_token([1.0, 2.0], kept=3) == [1.0, 2.0]  # nothing was cut
    assert per_kept_token([1.0, 2.0], kept=1) == []  # one token: no entry to charge
