"""Token healing: the completion first rewrites the prompt's backed-off partial word; text is reported from the prompt's end."""

import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.healing import allowed_tokens, heal, still_pending, vocabulary, vocabulary_strings
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.speculative import Lossless
from earlyexit.runtime.heads import ExitHeads

from conftest import make_tiny_hf


@pytest.fixture
def model(tiny_hf):
    return GPT2.from_hf(tiny_hf)


PROMPTS = ["ret", "self.it", "import o", "def add(a, b):\n    retu", "for i in ran", "        retu", "x = self.ite", "def f():\n    ",
           "class A:\n    x = 1\n\n    "]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_first_token_extends_the_backed_off_text(model, tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    kept, prefix = heal(ids, tiny_tokenizer)
    allowed = allowed_tokens(prefix, tiny_tokenizer)
    assert 1 <= len(kept) < len(ids) and kept == ids[:len(kept)] and prefix == tiny_tokenizer.decode(ids[len(kept):])
    vocabulary = vocabulary_strings(tiny_tokenizer)
    assert allowed.any() and all(vocabulary[i].startswith(prefix) or (prefix.startswith(vocabulary[i]) and prefix[len(vocabulary[i]):].isspace())
                                 for i in torch.nonzero(allowed).flatten().tolist())
    c = complete(model, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=6, token_healing=True))
    assert c.healed_prefix == prefix and c.prompt_tokens == len(kept)
    assert tiny_tokenizer.decode(c.token_ids).startswith(prefix)  # the backed-off text is written again first
    assert tiny_tokenizer.decode(kept + c.token_ids) == prompt + c.text  # the text continues the prompt exactly


@pytest.mark.parametrize("prompt", PROMPTS)
def test_healing_backs_off_the_longest_run_a_single_token_could_cover(tiny_tokenizer, prompt):
    ids = tiny_tokenizer.encode(prompt)
    kept, prefix = heal(ids, tiny_tokenizer)
    one_more = tiny_tokenizer.decode(ids[len(kept) - 1:])
    assert len(kept) == 1 or not any(t.startswith(one_more) for t in vocabulary_strings(tiny_tokenizer))
    assert heal(ids, tiny_tokenizer, "token")[1] == tiny_tokenizer.decode(ids[-1:])  # the last token only, as before


@pytest.mark.parametrize("prompt,rest", [("def f():\n    ", "return x"), ("class A:\n    x = 1\n\n    ", "def f"),
                                         ("def add(a, b):\n    retu", "rn a"), ("x = self.ite", "ms"), ("import o", "s"), ("ret", "urn")])
def test_the_whole_texts_own_tokens_are_always_allowed(tiny_tokenizer, prompt, rest):
    """Whatever the user goes on to type, the tokens the model saw for the whole text in training can be generated."""
    ids = tiny_tokenizer.encode(prompt)
    kept, pending = heal(ids, tiny_tokenizer)
    whole = tiny_tokenizer.encode(prompt + rest)
    assert whole[:len(kept)] == kept
    for token in whole[len(kept):]:
        if not pending:
            break
        assert allowed_tokens(pending, tiny_tokenizer)[token], (pending, tiny_tokenizer.decode([token]))
        pending = still_pending(pending, tiny_tokenizer.decode([token]))
    assert pending == ""
    # and a blank indented line is not forced deeper: its whitespace may be written the way the code after it splits it
    if prompt.endswith("    "):
        assert tiny_tokenizer.decode([whole[len(kept)]]) != tiny_tokenizer.decode(ids[len(kept):])


def test_token_mode_is_the_earlier_healing(model, tiny_tokenizer):
    """The last token only, extended by the first new token: what results scored before word healing used."""
    ids = tiny_tokenizer.encode("def f():\n    ")
    kept, prefix = heal(ids, tiny_tokenizer, "token")
    allowed = allowed_tokens(prefix, tiny_tokenizer, "token")
    vocabulary = vocabulary_strings(tiny_tokenizer)
    assert kept == ids[:-1] and all(vocabulary[i].startswith(prefix) for i in torch.nonzero(allowed).flatten().tolist())
    c = complete(model, tiny_tokenizer, "def f():\n    ", GenerationSettings(max_new_tokens=4, token_healing=True, healing_mode="token"))
    assert tiny_tokenizer.decode(c.token_ids[:1]).startswith(prefix)


def test_a_word_split_into_several_tokens_is_backed_off_whole(tiny_tokenizer):
    ids = tiny_tokenizer.encode("def add(a, b):\n    retu")
    pieces = [tiny_tokenizer.decode([i]) for i in ids[-3:]]
    assert pieces == [" r", "et", "u"]  # how this tokenizer splits it: backing off "u" alone would leave " r", "et"
    kept, prefix = heal(ids, tiny_tokenizer)
    allowed = allowed_tokens(prefix, tiny_tokenizer)
    assert (kept, prefix) == (ids[:-3], " retu")
    assert [vocabulary_strings(tiny_tokenizer)[i] for i in torch.nonzero(allowed).flatten().tolist()] == [" return"]
    settings = GenerationSettings(max_new_tokens=3, token_healing=True, healing_mode="token")
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer)))
    assert complete(model, tiny_tokenizer, "def add(a, b):\n    retu", settings).healed_prefix == "u"
    with pytest.raises(EarlyExitError, match="healing_mode"):
        GenerationSettings(healing_mode="line")


def test_healing_is_off_by_default_and_skipped_for_one_token_prompts(model, tiny_tokenizer):
    plain = complete(model, tiny_tokenizer, "ret", GenerationSettings(max_new_tokens=5))
    assert plain.healed_prefix == "" and plain.prompt_tokens == len(tiny_tokenizer.encode("ret"))
    one = tiny_tokenizer.encode("x")
    assert len(one) == 1 and heal(one, tiny_tokenizer) == (one, "")


HEALED = ["self.it", "class A:\n    x = 1\n\n    ", "def f():\n    ", "def add(a, b):\n    retu"]


def test_lossless_and_batches_with_healing_equal_full_alone(model, tiny_tokenizer):
    """The backed-off text may take several constrained tokens (`1`, `\n\n   `, ...): every policy writes them as
    full mode does, alone and batched, and lossless mode's stop sees them as early-exit mode's does."""
    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.heads import Thresholds
    from earlyexit.runtime.policies import EarlyExit, FullDepth

    settings = GenerationSettings(max_new_tokens=15, token_healing=True)
    heads = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        heads.layer_bias[:, 1] = 5.0  # exit early, often wrongly
        heads.cls.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))  # and stop now and then
    full = [complete(model, tiny_tokenizer, p, settings) for p in HEALED]
    assert any(tiny_tokenizer.decode(c.token_ids[:1]) != c.healed_prefix for c in full)  # some took several tokens
    for draft in ("same", "int8"):
        lossless = Lossless(model, heads, exit_threshold=0.1, max_draft=3, draft=draft)
        for p, f in zip(HEALED, full):
            got = complete(model, tiny_tokenizer, p, settings, policy=lossless)
            assert (got.token_ids, got.text) == (f.token_ids, f.text)
        assert [c.token_ids for c in complete_batch(model, tiny_tokenizer, HEALED, settings, policy=lossless)] == [c.token_ids for c in full]
    stopping, no_exits = Lossless(model, heads, max_draft=3, stop_threshold=0.6), EarlyExit(model, heads, Thresholds(exit=1.0, stop=0.6))
    reference = [complete(model, tiny_tokenizer, p, settings, policy=no_exits) for p in HEALED]
    assert [c.finish_reason for c in reference] == ["max_tokens", "stop", "stop", "max_tokens"]  # one stop while rewriting
    written = tiny_tokenizer.decode(reference[1].token_ids)
    assert reference[1].healed_prefix.startswith(written) and written != reference[1].healed_prefix and reference[1].text == ""
    for policy in (FullDepth(), EarlyExit(model, heads, Thresholds(exit=0.1, stop=0.6)), stopping):
        alone = [complete(model, tiny_tokenizer, p, settings, policy=policy) for p in HEALED]
        together = complete_batch(model, tiny_tokenizer, HEALED, settings, policy=policy)
        assert [(c.token_ids, c.finish_reason, c.text) for c in together] == [(c.token_ids, c.finish_reason, c.text) for c in alone]
    assert [(c.token_ids, c.finish_reason) for c in alone] == [(c.token_ids, c.finish_reason) for c in reference]  # lossless, stopping


def test_allowed_masks_are_kept_per_pending_text_and_handed_out_as_copies(tiny_tokenizer):
    vocab = vocabulary(tiny_tokenizer)
    first = vocab.allowed(" retu")
    first[:] = True  # a caller's change must not reach the next caller
    again = vocab.allowed(" retu")
    assert [vocab.strings[i] for i in torch.nonzero(again).flatten().tolist()] == [" return"]
    assert (" retu", True) in vocab._masks and not torch.equal(vocab.allowed(" retu", whitespace_splits=False), first)
