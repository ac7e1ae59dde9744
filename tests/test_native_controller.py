"""The controller in C++ (csrc's `Controller`, `Step::decide`, `Step::window_checked`): early exit on the native step
in one call per token, and lossless mode's stop check in its native verify window, deciding what the torch paths do."""

import pytest
import torch

from earlyexit.runtime import native
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.heads import STOP, Thresholds
from earlyexit.runtime.lean_step import attach_lean_step
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit
from earlyexit.runtime.quantize import quantize_int8
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf
from test_lean_exit import decisive_heads
from test_speculative import random_heads

pytestmark = pytest.mark.skipif(native.extension() is None, reason="the native step is not built here")


def spy(obj, name, calls):
    """Count calls of obj.name (an instance attribute shadowing the method)."""
    method = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return method(*args, **kwargs)

    setattr(obj, name, counted)


@pytest.mark.parametrize("seed", range(4))
def test_the_native_controllers_probabilities_are_the_torch_checks(tiny_tokenizer, seed):
    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=48, seed=seed)).eval())
    heads = decisive_heads(model, seed)
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.8))
    c = policy.native_controller(3)
    g = torch.Generator().manual_seed(seed)
    for layer in range(3):
        for prev in range(4):
            h = torch.randn(1, 48, generator=g) * (1 + 3 * seed)
            ours = c.probs(h[0].contiguous(), layer, prev)
            assert torch.allclose(ours, torch.tensor(policy.lean_probs(layer, h, prev)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("exit_layers", [None, [1]])
@pytest.mark.parametrize("seed", range(3))
def test_early_exit_in_one_native_call_per_token_decides_what_the_torch_lean_path_does(tiny_tokenizer, kind, exit_layers, seed):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, n_embd=64, seed=seed)).eval()
    heads = decisive_heads(model, seed)
    with torch.no_grad():
        heads.layer_bias[:, STOP] -= 3.0  # stops rare: completions run long enough to exit and stop here and there
    m = quantize_int8(model) if kind == "int8" else attach_lean_step(model)
    policy = EarlyExit(m, heads, Thresholds(exit=0.5, stop=0.8), exit_layers=exit_layers)
    prompt, settings = "def add(a, b):\n    return a", GenerationSettings(max_new_tokens=24)
    calls = []
    spy(m.lean, "decide", calls)
    ours = complete(m, tiny_tokenizer, prompt, settings, policy=policy)
    assert len(calls) == len(ours.token_ids) - 1 + (ours.finish_reason == "stop")  # every decoded token, one call
    no_native = policy.native_controller
    policy.native_controller = lambda *a: None  # the torch lean path: a call per run of blocks, the checks in torch
    torch_path = complete(m, tiny_tokenizer, prompt, settings, policy=policy)
    policy.native_controller = no_native
    assert (ours.token_ids, ours.exit_layers, ours.finish_reason) == (torch_path.token_ids, torch_path.exit_layers, torch_path.finish_reason)
    assert min(ours.exit_layers) < 4  # tokens did exit: the state copy ran
    if exit_layers is not None:
        assert set(ours.exit_layers) <= {2, 4}


def test_a_stop_threshold_of_one_and_no_exit_never_asks_the_controller(tiny_tokenizer):
    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, seed=1)).eval())
    heads = decisive_heads(model, 1)
    off = EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0))
    full = complete(model, tiny_tokenizer, "import os\n", GenerationSettings(max_new_tokens=12))
    got = complete(model, tiny_tokenizer, "import os\n", GenerationSettings(max_new_tokens=12), policy=off)
    assert got.token_ids == full.token_ids and set(got.exit_layers) == {3}


@pytest.mark.parametrize("exit_layers", [None, [0], [1, 2]])
@pytest.mark.parametrize("seed", range(4))
def test_lossless_with_a_stop_threshold_verifies_in_one_native_window_and_stops_where_early_exit_does(tiny_tokenizer, exit_layers, seed):
    """EarlyExit(exit=1, stop=s) asks for a stop only at its asked layers and the last; lossless' verify window asks at
    the same layers (the torch verify pass and the native one), so both write the same tokens and stop at the same one."""
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, n_embd=48, seed=seed, eos=tiny_tokenizer.eos_token_id)).eval()
    heads = random_heads(model, seed)
    heads.cfg.exit_layers = exit_layers
    with torch.no_grad():
        heads.layer_bias[:, STOP] += 0.5
    g = torch.Generator().manual_seed(300 + seed)
    prompt = torch.randint(1, len(tiny_tokenizer), (3 + 4 * seed,), generator=g).tolist()
    settings, stop = GenerationSettings(max_new_tokens=30), 0.45
    reference = complete(model, tiny_tokenizer, prompt, settings, policy=EarlyExit(model, heads, Thresholds(exit=1.0, stop=stop)))
    generic = complete(model, tiny_tokenizer, prompt, settings, policy=Lossless(model, heads, max_draft=3, stop_threshold=stop))
    attach_lean_step(model)
    calls = []
    spy(model.lean, "window_checked", calls)
    lossless = Lossless(model, heads, max_draft=3, stop_threshold=stop)
    got = complete(model, tiny_tokenizer, prompt, settings, policy=lossless)
    expected = (reference.token_ids, reference.finish_reason)
    assert (generic.token_ids, generic.finish_reason) == expected
    assert (got.token_ids, got.finish_reason) == expected
    assert calls or len(got.token_ids) <= 1  # the native window verified every round


def test_a_controller_that_does_not_match_the_model_is_refused(tiny_tokenizer):
    a = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, seed=0)).eval())
    b = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=0)).eval())
    c = EarlyExit(b, decisive_heads(b, 0), Thresholds(exit=0.5, stop=0.8)).native_controller(2)
    with pytest.raises(RuntimeError, match="controller does not match"):
        a.lean.decide(5, a.new_cache(1, 8), 0, 0, c)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("seed", range(3))
def test_the_confidence_rule_in_one_native_call_leaves_where_the_torch_lean_path_does(tiny_tokenizer, kind, seed):
    """Under the confidence rule the exit head runs inside the native call (its layer norm, adapter and head; an fp32
    model's int8 reranked head): the same exits, tokens and stops as the torch lean path."""
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, n_embd=64, seed=seed)).eval()
    heads = decisive_heads(model, seed)
    with torch.no_grad():
        heads.layer_bias[:, STOP] -= 3.0
    m = quantize_int8(model) if kind == "int8" else attach_lean_step(model)
    prompt, settings = "def add(a, b):\n    return a", GenerationSettings(max_new_tokens=24)

    def both(confidence):
        policy = EarlyExit(m, heads, Thresholds(exit=0.5, stop=0.8), exit_rule="confidence", confidence=confidence)
        calls = []
        spy(m.lean, "decide", calls)
        ours = complete(m, tiny_tokenizer, prompt, settings, policy=policy)
        del m.lean.decide
        policy.native_controller = lambda *a: None
        return ours, complete(m, tiny_tokenizer, prompt, settings, policy=policy), calls

    # the random heads' max probabilities are small: the loosest threshold at which some tokens stay and some leave
    for threshold in (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005):
        ours, torch_path, calls = both({0: threshold, 2: threshold / 2})
        assert (ours.token_ids, ours.exit_layers, ours.finish_reason) == (torch_path.token_ids, torch_path.exit_layers, torch_path.finish_reason)
        assert calls
        if 0 < sum(layer < 4 for layer in ours.exit_layers) < len(ours.exit_layers):
            break
    else:
        pytest.fail("no threshold left some tokens early and kept others")
    assert set(ours.exit_layers) <= {1, 3, 4}


def test_heads_off_the_cpu_get_no_native_controller(tiny_tokenizer):
    """A model moved off the CPU keeps its lean step (its native half off): early exit and lossless must then take
    the torch paths, not build a C++ controller over device tensors."""
    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, seed=0)).eval())
    heads = decisive_heads(model, 0)
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.8), exit_head="fp32")
    assert policy.native_controller(3) is not None
    off = heads.to("meta")
    assert native.controller(off, policy.bias_table.to("meta"), [True] * 3, [True, True, False], 0.5, 0.8) is None


def test_the_native_phase_timer_counts_what_each_token_ran(tiny_tokenizer):
    """csrc/phases.h: every block's phases once per token, the head once; an exit's check, exit head and state copy;
    nothing counted while the timer is off."""
    from test_heads import forced

    from earlyexit.runtime.heads import EXIT, ExitHeads

    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=48, seed=0)).eval())
    prompt, settings, done = "def add(a, b):", GenerationSettings(max_new_tokens=6), []

    def run(policy=None):
        done.append(complete(model, tiny_tokenizer, prompt, settings, policy=policy))

    phases = native.profile_phases(model.lean, run)
    calls, steps = {p["phase"]: p["calls"] for p in phases}, len(done[-1].token_ids) - 1  # the first token: the prefill's
    assert steps >= 3
    assert calls["QKV projection"] == calls["MLP down"] == 3 * steps and calls["layer norms"] == 2 * 3 * steps
    assert calls["final head (ln_f + vocabulary)"] == steps and calls["controller check"] == calls["state copy"] == 0
    assert all(p["ms"] > 0 for p in phases if p["calls"])
    policy = EarlyExit(model, forced(ExitHeads.for_backbone(model, rank=4), EXIT, from_layer=0), Thresholds(exit=0.5, stop=1.0),
                       exit_layers=[0], exit_rule="controller")
    calls = {p["phase"]: p["calls"] for p in native.profile_phases(model.lean, lambda: run(policy))}
    steps = len(done[-1].token_ids) - 1
    assert set(done[-1].exit_layers[1:]) == {1}  # every token left after block 1
    assert calls["QKV projection"] == steps and calls["controller check"] == calls["exit head"] == calls["state copy"] == steps
    assert calls["final head (ln_f + vocabulary)"] == 0
    complete(model, tiny_tokenizer, prompt, settings)  # the timer is off: nothing more counted
    assert {name: n for name, _, n in model.lean.native.phases()} == calls
