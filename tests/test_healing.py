"""Token healing: the first token must extend the prompt's backed-off last token; text is reported from the prompt's end."""

import pytest
import torch

from earlyexit.decoding import GenerationSettings, generate
from earlyexit.healing import heal
from earlyexit.model import GPT2
from earlyexit.speculative import Lossless
from earlyexit.heads import ExitHeads


@pytest.fixture
def model(tiny_hf):
    return GPT2.from_hf(tiny_hf)


@pytest.mark.parametrize("prompt", ["ret", "self.it", "import o", "def add(a, b):\n    retu", "for i in ran"])
def test_first_token_extends_the_backed_off_text(model, tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    kept, prefix, allowed = heal(ids, tiny_tokenizer)
    assert kept == ids[:-1] and prefix == tiny_tokenizer.decode(ids[-1:])
    assert allowed[ids[-1]]  # the original token is always allowed
    c = generate(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=6, token_healing=True))
    assert c.healed_prefix == prefix
    assert tiny_tokenizer.decode([c.token_ids[0]]).startswith(prefix)
    assert tiny_tokenizer.decode(kept + c.token_ids) == prompt + c.text  # the text continues the prompt exactly


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
