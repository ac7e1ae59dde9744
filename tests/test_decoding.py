"""Decoding behaviour beyond plain greedy: EOS, stop strings, processors, context limits."""

import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.model import GPT2


class EosIs:
    """The tiny tokenizer with a different EOS id, to make a random model stop."""

    def __init__(self, tok, eos):
        self.tok, self.eos_token_id = tok, eos

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture
def model(tiny_hf):
    return GPT2.from_hf(tiny_hf)


def test_eos_ends_the_completion_and_is_kept_in_ids_not_text(model, tiny_tokenizer):
    free = complete(model, tiny_tokenizer, "def add(", GenerationSettings(max_new_tokens=10))
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    got = complete(model, EosIs(tiny_tokenizer, eos), "def add(", GenerationSettings(max_new_tokens=10))
    assert got.finish_reason == "eos"
    assert got.token_ids == free.token_ids[:first + 1]
    assert len(got.token_ms) == len(got.token_ids) - 1


def test_stop_string_cuts_the_text(model, tiny_tokenizer):
    free = complete(model, tiny_tokenizer, "class Stack:", GenerationSettings(max_new_tokens=12))
    stop = free.text[4:6]
    got = complete(model, tiny_tokenizer, "class Stack:", GenerationSettings(max_new_tokens=12, stop_strings=[stop]))
    assert got.finish_reason == "stop_string"
    assert got.text == free.text[:free.text.find(stop)]
    assert stop not in got.text


def test_logits_processor_and_stopping_criteria_follow_transformers_conventions(model, tiny_tokenizer):
    class Ban(LogitsProcessor):
        def __init__(self, banned):
            self.banned = banned

        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, self.banned] = -float("inf")
            return scores

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 8, dtype=torch.bool)

    free = complete(model, tiny_tokenizer, "import", GenerationSettings(max_new_tokens=6))
    banned = free.token_ids[0]
    got = complete(model, tiny_tokenizer, "import", GenerationSettings(max_new_tokens=6), logits_processor=LogitsProcessorList([Ban(banned)]))
    assert banned not in got.token_ids
    prompt_len = got.prompt_tokens
    stopped = complete(model, tiny_tokenizer, "import", GenerationSettings(max_new_tokens=30), stopping_criteria=StoppingCriteriaList([AtLength()]))
    assert stopped.finish_reason == "stopping_criteria"
    assert prompt_len + len(stopped.token_ids) == max(8, prompt_len + 1)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_max_new_tokens_must_be_a_positive_integer(bad):
    with pytest.raises(EarlyExitError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=bad)


def test_empty_prompt_is_refused(model, tiny_tokenizer):
    with pytest.raises(EarlyExitError, match="prompt is empty"):
        complete(model, tiny_tokenizer, "")


def test_too_long_prompt_is_refused_or_truncated_on_request(model, tiny_tokenizer):
    long_prompt = "x = 1\n" * 200  # far over the tiny model's 96 positions
    with pytest.raises(EarlyExitError, match="context of 96"):
        complete(model, tiny_tokenizer, long_prompt, GenerationSettings(max_new_tokens=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = complete(model, tiny_tokenizer, long_prompt, GenerationSettings(max_new_tokens=8, truncate_prompt=True))
    assert got.prompt_tokens == 96 - 8 and got.prompt_truncated_tokens > 0
    assert any("left-truncated" in str(w.message) for w in caught)


def test_generate_and_generate_batch_run_without_autograd(model, tiny_tokenizer):
    """Decoding records no graph: every step runs in inference mode, alone and batched."""
    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.policies import FullDepth

    seen = []

    class Recording(FullDepth):
        def step(self, *args, **kwargs):
            seen.append(torch.is_inference_mode_enabled())
            return super().step(*args, **kwargs)

        def step_batch(self, *args, **kwargs):
            seen.append(torch.is_inference_mode_enabled())
            return super().step_batch(*args, **kwargs)

    complete(model, tiny_tokenizer, "def f", GenerationSettings(max_new_tokens=3), policy=Recording())
    complete_batch(model, tiny_tokenizer, ["def f", "x"], GenerationSettings(max_new_tokens=3), policy=Recording())
    assert len(seen) >= 4 and all(seen)
