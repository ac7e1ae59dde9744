"""Token healing: the first token must extend the prompt's backed-off last token; text is reported from the prompt's end."""

import pytest
import torch

from earlyexit.decoding import GenerationSettings, generate
from earlyexit.errors import EarlyExitError
from earlyexit.healing import heal, vocabulary_strings
from earlyexit.model import GPT2
from earlyexit.speculative import Lossless
from earlyexit.heads import ExitHeads

from conftest import make_tiny_hf


@pytest.fixture
def model(tiny_hf):
    return GPT2.from_hf(tiny_hf)


PROMPTS = ["ret", "self.it", "import o", "def add(a, b):\n    retu", "for i in ran", "        retu", "x = self.ite"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_first_token_extends_the_backed_off_text(model, tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    kept, prefix, allowed = heal(ids, tiny_tokenizer)
    assert 1 <= len(kept) < len(ids) and kept == ids[:len(kept)] and prefix == tiny_tokenizer.decode(ids[len(kept):])
    vocabulary = vocabulary_strings(tiny_tokenizer)
    assert allowed.any() and all(vocabulary[i].startswith(prefix) for i in torch.nonzero(allowed).flatten().tolist())
    c = generate(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=6, token_healing=True))
    assert c.healed_prefix == prefix and c.prompt_tokens == len(kept)
    assert tiny_tokenizer.decode([c.token_ids[0]]).startswith(prefix)
    assert tiny_tokenizer.decode(kept + c.token_ids) == prompt + c.text  # the text continues the prompt exactly


@pytest.mark.parametrize("prompt", PROMPTS)
def test_healing_backs_off_the_longest_run_a_single_token_could_cover(tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    kept, prefix, _ = heal(ids, tiny_tokenizer)
    one_more = tiny_tokenizer.decode(ids[len(kept) - 1:])
    assert len(kept) == 1 or not any(t.startswith(one_more) for t in vocabulary_strings(tiny_tokenizer))
    assert heal(ids, tiny_tokenizer, max_tokens=1)[1] == tiny_tokenizer.decode(ids[-1:])  # the last token only, as before


def test_a_word_split_into_several_tokens_is_backed_off_whole(tiny_tokenizer):
    ids = tiny_tokenizer.encode("def add(a, b):\n    retu")
    pieces = [tiny_tokenizer.decode([i]) for i in ids[-3:]]
    assert pieces == [" r", "et", "u"]  # how this tokenizer splits it: backing off "u" alone would leave " r", "et"
    kept, prefix, allowed = heal(ids, tiny_tokenizer)
    assert (kept, prefix) == (ids[:-3], " retu")
    assert [vocabulary_strings(tiny_tokenizer)[i] for i in torch.nonzero(allowed).flatten().tolist()] == [" return"]
    settings = GenerationSettings(max_new_tokens=3, token_healing=True, healing_tokens=2)
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer)))
    assert generate(model, tiny_tokenizer, "def add(a, b):\n    retu", settings).healed_prefix == "etu"
    with pytest.raises(EarlyExitError, match="healing_tokens"):
        GenerationSettings(healing_tokens=0)


def test_healing_is_off_by_default_and_skipped_for_one_token_prompts(model, tiny_tokenizer):
    plain = generate(model, tiny_tokenizer, "ret", GenerationSettings(max_new_tokens=5))
    assert plain.healed_prefix == "" and plain.prompt_tokens == len(tiny_tokenizer.encode("ret"))
    one = tiny_tokenizer.encode("x")
    assert len(one) == 1 and heal(one, tiny_tokenizer) == (one, "", None)


def test_lossless_with_healing_still_equals_full(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=15, token_healing=True)
    full = generate(model, tiny_tokenizer, "self.it", settings)
    heads = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        heads.layer_bias[:, 1] = 5.0  # exit early, often wrongly
    got = generate(model, tiny_tokenizer, "self.it", settings, policy=Lossless(model, heads, exit_threshold=0.1))
    assert got.token_ids == full.token_ids and got.text == full.text
