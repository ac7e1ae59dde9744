"""Property-based tests of the front door (hypothesis): any input is either taken or refused with one EarlyExitError
line naming the problem; never another exception, never a silently wrong result."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the [dev] extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from earlyexit.errors import EarlyExitError  # noqa: E402
from earlyexit.runtime.decoding import GenerationSettings, complete, prompt_ids  # noqa: E402
from earlyexit.runtime.heads import ExitHeads, Thresholds  # noqa: E402
from earlyexit.runtime.model import GPT2  # noqa: E402
from earlyexit.runtime.policies import EarlyExit, check_exit_layers  # noqa: E402

from conftest import make_tiny_hf  # noqa: E402

ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True), st.text(max_size=8),
                     st.binary(max_size=8), st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(e: EarlyExitError) -> bool:
    return bool(str(e)) and "\n" not in str(e)


@FAST
@given(value=ANYTHING, name=st.sampled_from(["exit", "stop"]))
def test_a_threshold_is_a_number_in_the_unit_interval_or_refused(value, name):
    t = Thresholds()
    try:
        setattr(t, name, value)
    except EarlyExitError as e:
        assert one_line(e) and name in str(e)
        assert getattr(t, name) == 1.0  # a refused value is not half-set
        return
    assert isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


@FAST
@given(max_new=ANYTHING, stops=st.one_of(ANYTHING, st.lists(st.text(max_size=4), max_size=3)))
def test_generation_settings_take_or_refuse_every_value(max_new, stops):
    try:
        s = GenerationSettings(max_new_tokens=max_new, stop_strings=stops)
    except EarlyExitError as e:
        assert one_line(e)
        return
    assert isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 1
    assert isinstance(s.stop_strings, (list, tuple)) and all(isinstance(x, str) and x for x in s.stop_strings)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=32)).eval()


@FAST
@given(prompt=st.one_of(ANYTHING, st.lists(st.one_of(st.integers(-3, 400), st.floats(), st.booleans()), max_size=6),
                        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)))
def test_any_prompt_becomes_ids_inside_the_vocabulary_or_is_refused(tiny, tiny_tokenizer, prompt):
    try:
        ids = prompt_ids(tiny_tokenizer, tiny, prompt)
    except EarlyExitError as e:
        assert one_line(e)
        return
    assert all(isinstance(i, int) and 0 <= i < tiny.dims.vocab_size for i in ids)
    if not isinstance(prompt, str):  # ids are taken as they are, never re-read
        assert ids == list(prompt)


@FAST
@given(layers=st.one_of(ANYTHING, st.lists(st.one_of(st.integers(-3, 15), st.booleans(), st.floats()), max_size=5)),
       n_layer=st.integers(2, 12))
def test_exit_layers_are_block_indices_below_the_last_or_refused(layers, n_layer):
    try:
        chosen = check_exit_layers(layers, n_layer)
    except EarlyExitError as e:
        assert one_line(e) and "exit_layers" in str(e)
        return
    assert chosen is None or all(isinstance(x, int) and 0 <= x < n_layer - 1 for x in chosen)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exit_t=st.floats(0, 1), stop_t=st.floats(0, 1), layers=st.none() | st.lists(st.integers(0, 0), min_size=1, max_size=1),
       n=st.integers(1, 6), text=st.text(alphabet="abc ():=\n", min_size=1, max_size=10))
def test_early_exit_completions_are_bounded_and_only_leave_where_asked(tiny, tiny_tokenizer, exit_t, stop_t, layers, n, text):
    heads = ExitHeads.for_backbone(tiny, rank=0)
    with torch.no_grad():
        heads.cls.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(n))
    c = complete(tiny, tiny_tokenizer, text, GenerationSettings(max_new_tokens=n),
                 policy=EarlyExit(tiny, heads, Thresholds(exit=exit_t, stop=stop_t), exit_layers=layers))
    assert len(c.token_ids) <= n and len(c.exit_layers) == len(c.token_ids)
    assert all(1 <= layer <= 2 for layer in c.exit_layers)
    assert c.finish_reason in ("eos", "max_tokens", "stop")


PIECES = ["def add(a, b):\n", "    return a + b\n", "import os\n", "class Stack:\n", "for i in range(", "x = [1, 2", "if x:\n    "]


@pytest.fixture(scope="module")
def peaked(tiny_tokenizer):
    """A 4-layer tiny model with peaked logits (batch float orders rarely tie) and decisive random heads."""
    from test_batch import random_heads, tiny

    model = tiny(tiny_tokenizer, seed=7)
    return model, random_heads(model, 7)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join), min_size=1, max_size=5),
       n=st.integers(1, 10), mode=st.sampled_from(["full", "early-exit", "lossless"]), stop=st.sampled_from([(), ("\n",)]))
def test_any_batch_writes_what_each_prompt_writes_alone(peaked, tiny_tokenizer, rows, n, mode, stop):
    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.policies import FullDepth
    from earlyexit.runtime.speculative import Lossless

    model, heads = peaked
    policy = {"full": FullDepth(), "early-exit": EarlyExit(model, heads, Thresholds(exit=0.6, stop=0.95)),
              "lossless": Lossless(model, heads, draft="same", max_draft=3)}[mode]
    s = GenerationSettings(max_new_tokens=n, stop_strings=stop)
    together = complete_batch(model, tiny_tokenizer, rows, s, policy=policy)
    for prompt, row in zip(rows, together):
        alone = complete(model, tiny_tokenizer, prompt, s, policy=policy)
        assert (row.token_ids, row.exit_layers, row.finish_reason) == (alone.token_ids, alone.exit_layers, alone.finish_reason)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join), n=st.integers(1, 16), draft=st.integers(1, 6),
       exit_t=st.sampled_from([0.3, 0.6, 1.0]))
def test_lossless_writes_full_modes_tokens_for_any_prompt_and_draft(peaked, tiny_tokenizer, text, n, draft, exit_t):
    from earlyexit.runtime.speculative import Lossless

    model, heads = peaked
    s = GenerationSettings(max_new_tokens=n)
    full = complete(model, tiny_tokenizer, text, s)
    lossless = complete(model, tiny_tokenizer, text, s, policy=Lossless(model, heads, exit_threshold=exit_t, draft="same", max_draft=draft))
    assert lossless.token_ids == full.token_ids
