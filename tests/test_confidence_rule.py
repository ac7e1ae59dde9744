"""The confidence rule: exits decided by the exit head's own max probability, the same on every path (generic, lean,
batched), where its thresholds say and nowhere else; and its calibration (thresholds in cascade order, asked layers by
expected cost)."""

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.batch import complete_batch
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.heads import Thresholds
from earlyexit.runtime.lean_step import attach_lean_step
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit, check_confidence
from earlyexit.training.confidence_rule import best_threshold, cascade_thresholds, choose, simulate
from earlyexit.training.exit_layers import PieceCosts

from conftest import make_tiny_hf
from test_batch import PROMPTS
from test_lean_exit import decisive_heads

SETTINGS = GenerationSettings(max_new_tokens=20)


def tiny(tok, seed, n_layer=4):
    hf = make_tiny_hf(len(tok), seed=seed, n_layer=n_layer, n_positions=128)
    with torch.no_grad():  # peaked distributions: exit heads are often confident, and batch float orders rarely tie
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() >= 2 else None
    return GPT2.from_hf(hf).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("confidence", [{0: 0.5}, {1: 0.3, 2: 0.6}, 0.4])
def test_every_path_decides_the_same_exits(tiny_tokenizer, seed, confidence):
    model = tiny(tiny_tokenizer, seed)
    policy = EarlyExit(model, decisive_heads(model, seed), Thresholds(exit=0.9, stop=0.95), exit_rule="confidence",
                       confidence=confidence)
    generic = [complete(model, tiny_tokenizer, p, SETTINGS, policy=policy) for p in PROMPTS]
    attach_lean_step(model)
    lean = [complete(model, tiny_tokenizer, p, SETTINGS, policy=policy) for p in PROMPTS]
    batched = complete_batch(model, tiny_tokenizer, PROMPTS, SETTINGS, policy=policy)
    for g, le, b in zip(generic, lean, batched):
        assert g.token_ids == le.token_ids == b.token_ids
        assert g.exit_layers == le.exit_layers == b.exit_layers
    asked = set(policy.confidence)
    layers = {n for c in generic for n in c.exit_layers}
    assert layers <= {layer + 1 for layer in asked} | {4}  # exits only where a threshold is
    assert layers & {layer + 1 for layer in asked}  # and some did exit: the comparison is not vacuous


def test_the_fused_confidence_kernel_decides_what_the_head_s_logits_decide(tiny_tokenizer, monkeypatch):
    """kernel_backend="triton" (a GPU's path; the interpreter here): the exit_confidence kernel's max probability of
    the exit heads' vector, logits written only for the rows that leave; the same exits and tokens as torch's."""
    import earlyexit.kernels.dispatch as K

    model = tiny(tiny_tokenizer, 1)
    heads = decisive_heads(model, 1)
    calls = []
    fused = K.exit_confidence
    monkeypatch.setattr(K, "exit_confidence", lambda *a, **k: calls.append(a[1]) or fused(*a, **k))
    runs = {}
    for backend in ("torch", "triton"):
        policy = EarlyExit(model, heads, Thresholds(exit=0.9, stop=1.0), kernel_backend=backend, exit_rule="confidence",
                           confidence={1: 0.3, 2: 0.6}, exit_head="fp32")  # fp32: the head a GPU's exits take
        runs[backend] = ([complete(model, tiny_tokenizer, p, SETTINGS, policy=policy) for p in PROMPTS[:2]],
                         complete_batch(model, tiny_tokenizer, PROMPTS[:2], SETTINGS, policy=policy))
        assert bool(calls) == (backend == "triton")  # torch's path projects the head and takes its softmax
    assert K.last_backend["exit_confidence"] == "triton"
    assert calls and all(ln is None for ln in calls)  # the heads' own LN_l + adapter ran: no second layer norm
    for path in range(2):
        for t, f in zip(runs["torch"][path], runs["triton"][path]):
            assert t.token_ids == f.token_ids and t.exit_layers == f.exit_layers
    layers = {n for c in runs["triton"][0] for n in c.exit_layers}
    assert layers & {2, 3} and 4 in layers  # some tokens left early, some ran every block


def test_a_token_leaves_exactly_when_the_head_is_sure_enough(tiny_tokenizer):
    model = attach_lean_step(tiny(tiny_tokenizer, 0))
    heads = decisive_heads(model, 0)
    every = EarlyExit(model, heads, Thresholds(exit=0.9, stop=1.0), exit_rule="confidence", confidence={1: 0.0})
    never = EarlyExit(model, heads, Thresholds(exit=0.9, stop=1.0), exit_rule="confidence", confidence={1: 1.0})
    off = EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0), exit_rule="confidence", confidence={1: 0.0})
    prompt = "def add(a, b):"
    assert set(complete(model, tiny_tokenizer, prompt, SETTINGS, policy=every).exit_layers[1:]) == {2}
    full = complete(model, tiny_tokenizer, prompt, SETTINGS)
    for policy in (never, off):  # a threshold no probability reaches, and exits switched off: full depth, full's tokens
        c = complete(model, tiny_tokenizer, prompt, SETTINGS, policy=policy)
        assert c.token_ids == full.token_ids and set(c.exit_layers) == {4}


def test_the_rule_follows_the_heads_and_the_choice(tiny_tokenizer):
    model = tiny(tiny_tokenizer, 0)
    heads = decisive_heads(model, 0)
    assert EarlyExit(model, heads).exit_rule == "controller"  # nothing calibrated: the study's rule
    with pytest.raises(EarlyExitError, match="no confidence thresholds"):
        EarlyExit(model, heads, exit_rule="confidence")
    heads.cfg.exit_confidence = {"2": 0.7}
    auto = EarlyExit(model, heads)
    assert auto.exit_rule == "confidence" and auto.confidence == {2: 0.7}
    assert EarlyExit(model, heads, exit_rule="controller").confidence is None
    assert EarlyExit(model, heads, confidence=0.5).confidence == {2: 0.5}  # one threshold over the calibrated layers
    with pytest.raises(EarlyExitError, match="exit_rule"):
        EarlyExit(model, heads, exit_rule="vibes")
    with pytest.raises(EarlyExitError, match="not 'controller'"):
        EarlyExit(model, heads, exit_rule="controller", confidence=0.5)


@given(value=st.one_of(st.floats(allow_nan=True), st.integers(-2, 3), st.booleans(), st.text(max_size=2),
                       st.dictionaries(st.one_of(st.integers(-2, 5), st.sampled_from(["1", "x", "-1"]), st.booleans()),
                                       st.one_of(st.floats(-1, 2), st.just(float("nan")), st.booleans()), max_size=3)))
@hsettings(max_examples=300, deadline=None)
def test_check_confidence_takes_exactly_the_valid_values(value):
    def layer_ok(k):
        k = int(k) if isinstance(k, str) and k.isdigit() else k
        return isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 3

    def number_ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1

    valid = number_ok(value) or (isinstance(value, dict) and all(layer_ok(k) and number_ok(v) for k, v in value.items()))
    if valid:
        out = check_confidence(value, 4, [0, 2])
        assert all(0 <= v <= 1 for v in out.values()) and set(out) <= {0, 1, 2}
    else:
        with pytest.raises(EarlyExitError):
            check_confidence(value, 4, [0, 2])


COSTS = PieceCosts(block=1.0, check=0.0, fill=0.1, exit_head=0.5, final_head=2.0)


def test_cascade_thresholds_are_set_on_the_tokens_that_reach_each_layer():
    # layer 0: tokens 0, 1 sure and right; layer 1: of the rest, token 2 sure and right, token 3 sure and wrong
    max_prob = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.8, 0.7]])
    agree = torch.tensor([[True, True, False, False], [False, False, True, False]])
    assert cascade_thresholds(max_prob, agree, [0, 1], 1.0) == pytest.approx({0: 0.9, 1: 0.8})
    assert best_threshold(max_prob[1], agree[1], 1.0) == pytest.approx((0.8, 0.25))


def test_simulate_counts_blocks_heads_and_copies_by_hand():
    max_prob = torch.tensor([[0.9, 0.2], [0.1, 0.1]])
    agree = torch.tensor([[True, False], [False, False]])
    r = simulate(max_prob, agree, {0: 0.5}, COSTS, 3)
    # token 0: head 0.5 + 1 block + 2 copies 0.2 = 1.7; token 1: head 0.5 + 3 blocks + final head 2 = 5.5
    assert r["ms_per_token"] == pytest.approx((1.7 + 5.5) / 2) and r["mean_layers"] == 2.0 and r["agreement"] == 1.0
    assert r["speedup_vs_full"] == pytest.approx(5.0 / 3.6)


def test_choose_asks_nowhere_when_no_exit_pays_and_somewhere_when_one_does():
    sure = torch.tensor([[0.95] * 8, [0.2] * 8])
    right = torch.ones(2, 8, dtype=torch.bool)
    thresholds, steps = choose(sure, right, COSTS, 3, 0.99)
    assert thresholds == pytest.approx({0: 0.95}) and steps[-1]["ms_per_token"] < steps[0]["ms_per_token"]
    dear = PieceCosts(block=1.0, check=0.0, fill=0.1, exit_head=50.0, final_head=2.0)
    assert choose(sure, right, dear, 3, 0.99)[0] == {}


def test_an_int8_copy_takes_its_own_calibration_and_an_empty_one_means_no_exits(tiny_tokenizer):
    from earlyexit.runtime.quantize import quantize_int8

    model = tiny(tiny_tokenizer, 0)
    int8 = quantize_int8(model)
    heads = decisive_heads(model, 0)
    heads.cfg.exit_confidence = {"1": 0.0}  # fp32: every token leaves after block 2
    assert EarlyExit(int8, heads).confidence == {1: 0.0}  # no int8 calibration: the fp32 one
    heads.cfg.exit_confidence_int8 = {}  # calibrated over int8: no exit pays
    policy = EarlyExit(int8, heads, Thresholds(exit=0.9, stop=1.0))
    assert policy.exit_rule == "confidence" and policy.confidence == {}
    c = complete(int8, tiny_tokenizer, "def add(a, b):", SETTINGS, policy=policy)
    assert set(c.exit_layers) == {4} and c.token_ids == complete(int8, tiny_tokenizer, "def add(a, b):", SETTINGS).token_ids
    assert EarlyExit(model, heads).confidence == {1: 0.0}  # the fp32 model keeps its own
