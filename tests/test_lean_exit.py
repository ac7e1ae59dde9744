"""Early exit on the lean single-token path (EarlyExit.lean_step): the generic path's decisions, exits and tokens."""

import pytest
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.runtime.heads import EXIT, ExitHeads, Thresholds
from earlyexit.runtime.lean_step import LeanFp32Step, attach_lean_step
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit
from earlyexit.runtime.quantize import quantize_int8

from conftest import make_tiny_hf
from test_speculative import random_heads


def decisive_heads(model, seed):
    """Random heads whose controller exits and stops often, at every layer: the lean path's every branch runs."""
    heads = random_heads(model, seed)  # test_speculative's: random but decisive, exits favoured
    with torch.no_grad():
        heads.layer_bias[:, 2] -= 2.0  # stops rarer than exits, so completions run a while
    return heads.eval()


def run(model, tok, policy, prompt, n=24):
    return complete(model, tok, prompt, GenerationSettings(max_new_tokens=n), policy=policy)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("exit_layers", [None, [1], [0, 2]])
def test_lean_early_exit_decides_and_writes_what_the_generic_path_does(tiny_tokenizer, seed, exit_layers):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, seed=seed)).eval()
    heads = decisive_heads(model, seed)
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.8), exit_layers=exit_layers)
    prompt = "def add(a, b):\n    return a"
    generic = run(model, tiny_tokenizer, policy, prompt)
    attach_lean_step(model)
    assert isinstance(model.lean, LeanFp32Step)
    lean = run(model, tiny_tokenizer, policy, prompt)
    assert lean.token_ids == generic.token_ids
    assert lean.exit_layers == generic.exit_layers
    assert lean.finish_reason == generic.finish_reason
    assert min(generic.exit_layers) < 4  # some token did exit: the comparison is not vacuous
    if exit_layers is not None:  # only the asked layers (and the last) are ever left from
        assert set(lean.exit_layers) <= {layer + 1 for layer in exit_layers} | {4}


def test_the_lean_path_is_the_one_taken_and_its_state_copy_fills_the_cache_as_the_reference_does(tiny_tokenizer, monkeypatch):
    from earlyexit.kernels.dispatch import state_copy

    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4)).eval())
    heads = decisive_heads(model, 0)
    with torch.no_grad():
        heads.layer_bias[:, EXIT] += 20.0  # every token exits after block 0
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0))
    calls = []
    monkeypatch.setattr(model, "block_branches", lambda *a: calls.append(a))  # the generic path would call this
    lean_cache, ref_cache = model.new_cache(1, 16), model.new_cache(1, 16)
    result = policy.step(model, torch.tensor([[5]]), lean_cache, 3, 0)
    assert result.layers == 1 and not calls
    h = model.lean.block(0, model.lean.embed(5, 3), ref_cache, 3)
    state_copy(h, policy.state_copy_weights, ref_cache.k, ref_cache.v, 1, 3, 3, backend="torch")
    assert torch.allclose(lean_cache.k[:, :, :, 3], ref_cache.k[:, :, :, 3], atol=1e-6)
    assert torch.allclose(lean_cache.v[:, :, :, 3], ref_cache.v[:, :, :, 3], atol=1e-6)
    # the native call's exit head (layer norm, adapter) sums in another order: equal up to the last bits
    assert torch.allclose(result.logits, policy.exit_logits(0, h, model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_lean_early_exit_matches_the_generic_int8_path(tiny_tokenizer, seed):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, n_embd=64, seed=seed)).eval()
    q = quantize_int8(model)
    assert q.lean is not None
    heads = decisive_heads(model, seed)
    policy = EarlyExit(q, heads, Thresholds(exit=0.5, stop=0.8), exit_layers=[0, 2])
    prompt = "def add(a, b):\n    return a"
    lean = run(q, tiny_tokenizer, policy, prompt)
    lean_path, q.lean = q.lean, None
    generic = run(q, tiny_tokenizer, policy, prompt)
    q.lean = lean_path
    # the int8 state copy reads int8 K/V rows where the generic path reads their dequantized copy: the same
    # numbers up to rounding, so the decisions agree on all but a near-tie
    same = sum(a == b for a, b in zip(lean.token_ids, generic.token_ids))
    assert same >= 0.9 * max(len(lean.token_ids), len(generic.token_ids))
    assert set(lean.exit_layers) <= {1, 3, 4}


def test_the_int8_state_copy_is_the_dequantized_one_within_int8_rounding(tiny_tokenizer):
    from earlyexit.kernels.dispatch import state_copy

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=64)).eval()
    q = quantize_int8(model)
    policy = EarlyExit(q, decisive_heads(model, 0))
    h = torch.randn(1, 64)
    lean_cache, ref_cache = q.new_cache(1, 8), q.new_cache(1, 8)
    with torch.inference_mode():
        q.lean.embed(1, 0)  # gathers the per-layer tensors
        for layer in (1, 2):
            q.lean.fill_kv(layer, h, lean_cache, 4)
        state_copy(h, policy.state_copy_weights, ref_cache.k, ref_cache.v, 1, 2, 4, backend="torch")
    scale = ref_cache.k[1:, :, :, 4].abs().max()
    assert (lean_cache.k[1:, :, :, 4] - ref_cache.k[1:, :, :, 4]).abs().max() < 0.05 * scale
    assert (lean_cache.v[1:, :, :, 4] - ref_cache.v[1:, :, :, 4]).abs().max() < 0.05 * ref_cache.v[1:, :, :, 4].abs().max()
    assert lean_cache.k[0].abs().sum() == 0  # layer 0 was not skipped: untouched


def test_where_the_controller_is_asked(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4))
    heads = ExitHeads.for_backbone(model, rank=0)
    ask = lambda policy: [layer for layer in range(4) if policy.asks(layer, 4)]  # noqa: E731
    assert ask(EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.5))) == [0, 1, 2, 3]
    assert ask(EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0))) == [0, 1, 2]  # the last layer can only stop
    assert ask(EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0), exit_layers=[2])) == [2]
    assert ask(EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.5), exit_layers=[2])) == [2, 3]
    assert ask(EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0))) == []
    policy = EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0), exit_layers=[1])
    policy.thresholds.exit = 0.3  # thresholds changed after construction are read live
    assert ask(policy) == [1]


@pytest.mark.parametrize("bad", [[3], [-1], [1.0], [True], "1,2", 2])
def test_exit_layers_outside_the_model_are_refused(tiny_tokenizer, bad):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4))
    with pytest.raises(EarlyExitError, match="exit_layers"):
        EarlyExit(model, ExitHeads.for_backbone(model, rank=0), exit_layers=bad)


def test_exits_take_an_int8_head_whose_argmax_is_the_fp32_heads_and_full_depth_tokens_keep_the_models_head(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, n_embd=64)).eval()
    heads = decisive_heads(model, 0)
    fast, exact = EarlyExit(model, heads), EarlyExit(model, heads, exit_head="fp32")
    assert fast.exit_head is not None and exact.exit_head is None
    h = torch.randn(64, 64)
    for layer in (0, 2):
        assert torch.equal(fast.exit_logits(layer, h, model).argmax(-1), exact.exit_logits(layer, h, model).argmax(-1))
        assert torch.equal(exact.exit_logits(layer, h, model), heads.head_logits(layer, h, model))
    # exits off: every token runs every block and takes the model's own head, so the tokens are full mode's
    settings = GenerationSettings(max_new_tokens=16)
    no_exits = EarlyExit(attach_lean_step(model), heads, Thresholds(exit=1.0, stop=1.0))
    prompt = "def add(a, b):\n    return a"
    assert complete(model, tiny_tokenizer, prompt, settings, policy=no_exits).token_ids == complete(model, tiny_tokenizer, prompt, settings).token_ids
    with pytest.raises(EarlyExitError, match="exit_head"):
        EarlyExit(model, heads, exit_head="int4")
    odd = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=40))  # 40 % 16 != 0: the int8 op cannot take it
    assert EarlyExit(odd, ExitHeads.for_backbone(odd, rank=0)).exit_head is None
    with pytest.raises(EarlyExitError, match="exit_head='int8'"):
        EarlyExit(odd, ExitHeads.for_backbone(odd, rank=0), exit_head="int8")
