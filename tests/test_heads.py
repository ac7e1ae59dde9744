"""Exit heads, the controller, early-exit decoding with state copying, and the heads' files."""

import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.heads import CONTINUE, EXIT, STOP, ExitHeads, Thresholds, load_heads
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit, FullDepth
from earlyexit.training.train_heads import action_labels

from conftest import make_tiny_hf


@pytest.fixture
def model(tiny_tokenizer):
    return GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, seed=11))


def forced(heads: ExitHeads, action: int, from_layer: int = 0) -> ExitHeads:
    """Make the controller choose `action` with probability ~1 at layers >= from_layer."""
    with torch.no_grad():
        heads.cls.weight.zero_()
        heads.layer_bias.zero_()
        heads.layer_bias[from_layer:, action] = 50.0
    return heads


def test_heads_are_a_small_share_of_the_backbone(model):
    heads = ExitHeads.for_backbone(model, rank=8)
    assert heads.parameter_share(model) < 0.10
    h = torch.randn(2, 5, model.dims.n_embd)
    # a fresh head is the backbone's final layer norm + tied head: layer L-1's own logits
    torch.testing.assert_close(heads.head_logits(0, h, model), model.logits(h))
    assert heads.action_logits(2, h, 3).shape == (2, 5, 3)


@pytest.mark.parametrize("seed,prompt", [(0, "def add(a, b):"), (1, "class Stack:\n    def push(self, item):"), (2, "x")])
def test_early_exit_with_exits_and_stop_off_equals_full(model, tiny_tokenizer, seed, prompt):
    heads = ExitHeads.for_backbone(model, rank=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    policy = EarlyExit(model, heads, Thresholds(exit=1.0, stop=1.0))
    settings = GenerationSettings(max_new_tokens=20)
    full = complete(model, tiny_tokenizer, prompt, settings)
    early = complete(model, tiny_tokenizer, prompt, settings, policy=policy)
    assert early.token_ids == full.token_ids and early.exit_layers == full.exit_layers


def test_exit_at_layer_one_uses_the_head_and_state_copies_the_skipped_layers(model, tiny_tokenizer):
    heads = forced(ExitHeads.for_backbone(model, rank=4), EXIT)
    policy = EarlyExit(model, heads, Thresholds(exit=0.5, stop=1.0))
    c = complete(model, tiny_tokenizer, "def add(a, b):", GenerationSettings(max_new_tokens=6), policy=policy)
    assert c.exit_layers == [4, 1, 1, 1, 1, 1]  # the first token comes from the full-depth prefill
    # one step by hand: the skipped layers' K/V at this position come from the exit hidden state
    cache = model.new_cache(1, capacity=8)
    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):")])[:, :5]
    FullDepth().prefill(model, ids[:, :4], cache)
    step = policy.step(model, ids[:, 4:5], cache, 4, 4)
    assert step.layers == 1 and not step.stop
    reference_cache = model.new_cache(1, capacity=8)
    FullDepth().prefill(model, ids[:, :4], reference_cache)
    h = model.block(0, model.embed(ids[:, 4:5], 4), reference_cache, 4)[:, -1]
    for layer in (1, 2, 3):
        k, v = model.h[layer].attn.kv(model.h[layer].ln_1(h[:, None]))
        torch.testing.assert_close(cache.k[layer, :, :, 4], k[:, :, 0])
        torch.testing.assert_close(cache.v[layer, :, :, 4], v[:, :, 0])
    torch.testing.assert_close(step.logits, policy.exit_logits(0, h, model))  # the int8-rerank head (see test_lean_exit)
    assert int(step.logits.argmax()) == int(heads.head_logits(0, h, model).argmax())


def test_stop_ends_the_completion_and_keeps_what_was_written(model, tiny_tokenizer):
    heads = forced(ExitHeads.for_backbone(model, rank=0), STOP, from_layer=3)
    heads.prev_bias.data[model.dims.n_layer, STOP] = -200.0  # not before the first token: let one be written
    policy = EarlyExit(model, heads, Thresholds(exit=1.0, stop=0.9))
    c = complete(model, tiny_tokenizer, "import os", GenerationSettings(max_new_tokens=10), policy=policy)
    assert c.finish_reason == "stop" and len(c.token_ids) == 1
    full = complete(model, tiny_tokenizer, "import os", GenerationSettings(max_new_tokens=10))
    assert c.token_ids == full.token_ids[:1]


@pytest.mark.parametrize("bad", [-0.1, 1.01, "0.5", True])
def test_thresholds_outside_unit_interval_are_refused(bad):
    with pytest.raises(EarlyExitError, match="threshold must be a number in \\[0, 1\\]"):
        Thresholds(exit=bad)


def test_action_labels_both_schemes():
    # 3 layers, 4 positions; reference tokens and each layer's prediction (last = full model)
    target = torch.tensor([[5, 6, 7, 8]])
    preds = torch.tensor([[[5, 0, 9, 0]], [[5, 6, 9, 8]], [[5, 6, 9, 1]]])
    agreement = action_labels(preds, target, "agreement")[:, 0]
    assert agreement[:, 0].tolist() == [EXIT, EXIT, EXIT]  # every layer agrees with a right full model
    assert agreement[:, 1].tolist() == [CONTINUE, EXIT, EXIT]
    assert agreement[:, 2].tolist() == [STOP, STOP, STOP]  # the full model is wrong
    assert agreement[:, 3].tolist() == [STOP, STOP, STOP]
    study = action_labels(preds, target, "study")[:, 0]
    assert study[:, 1].tolist() == [CONTINUE, EXIT, EXIT]
    assert study[:, 2].tolist() == [STOP, STOP, STOP]  # no layer is right
    assert study[:, 3].tolist() == [CONTINUE, EXIT, EXIT]  # layer 2 was right, even though the full model is not


def test_save_load_and_refusals(tmp_path, model, tiny_tokenizer):
    heads = ExitHeads.for_backbone(model, rank=4)
    heads.cfg.thresholds = Thresholds(exit=0.8, stop=0.95)
    heads.save(tmp_path)
    loaded = load_heads(tmp_path, model)
    assert loaded.cfg.thresholds == Thresholds(exit=0.8, stop=0.95)
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    other = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4, seed=12))
    with pytest.raises(EarlyExitError, match="different backbone weights"):
        load_heads(tmp_path, other)
    deeper = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=5, seed=11))
    with pytest.raises(EarlyExitError, match="layers 4, this model has 5"):
        load_heads(tmp_path, deeper)
    weights = tmp_path / "exit_heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(EarlyExitError, match="cannot read"):
        load_heads(tmp_path, model)
    (tmp_path / "exit_heads.json").write_text("{not json")
    with pytest.raises(EarlyExitError, match="not valid JSON"):
        load_heads(tmp_path, model)
    with pytest.raises(EarlyExitError, match="no exit heads"):
        load_heads(tmp_path / "elsewhere", model)


def test_early_exit_through_the_triton_kernels_matches_the_reference_path(model, tiny_tokenizer):
    import earlyexit.kernels.dispatch as K

    heads = forced(ExitHeads.for_backbone(model, rank=4), EXIT, from_layer=1)  # exit after block 1: two layers state-copied
    settings = GenerationSettings(max_new_tokens=8)
    runs = {}
    for backend in ("torch", "triton"):  # triton: the interpreter on CPU tensors
        policy = EarlyExit(model, heads, Thresholds(exit=0.4, stop=1.0), kernel_backend=backend)
        runs[backend] = complete(model, tiny_tokenizer, "def add(a, b):", settings, policy=policy)
        assert K.last_backend["layer_check"] == backend
    assert runs["triton"].token_ids == runs["torch"].token_ids
    assert runs["triton"].exit_layers == runs["torch"].exit_layers
    assert runs["torch"].exit_layers == [4] + [2] * 7


def test_the_policys_precomputed_bias_gives_the_heads_own_probabilities(model):
    heads = ExitHeads.for_backbone(model, rank=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    policy = EarlyExit(model, heads)
    d = model.dims.n_embd
    x, delta = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
    for layer in range(model.dims.n_layer):
        for prev in (0, 1, model.dims.n_layer):  # no previous token, shallowest, deepest
            h, probs = policy.check_rows(layer, x, delta, prev)
            assert torch.allclose(h, x + delta)
            assert torch.allclose(probs, heads.action_logits(layer, x + delta, prev).softmax(-1), atol=1e-5)
        prevs = torch.tensor([0, 2, model.dims.n_layer])  # per row, as in batched decoding
        _, probs = policy.check_rows(layer, x, delta, prevs)
        want = torch.stack([heads.action_logits(layer, x[i] + delta[i], int(p)).softmax(-1) for i, p in enumerate(prevs)])
        assert torch.allclose(probs, want, atol=1e-5)


def test_stops_and_decide_agree_where_the_threshold_does_not_round_to_float32(tiny_tokenizer):
    """0.1 rounds up in float32: a STOP probability of exactly float32(0.1) is above the threshold 0.1, for both."""
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer)))
    policy = EarlyExit(model, ExitHeads.for_backbone(model, rank=4).eval(), Thresholds(exit=0.5, stop=0.1))
    at = torch.tensor(0.1, dtype=torch.float32).item()  # 0.10000000149...
    below = torch.nextafter(torch.tensor(at), torch.tensor(0.0)).item()
    probs = torch.zeros(3, 3)
    probs[:, CONTINUE], probs[:, EXIT] = 0.01, 0.02
    probs[:, STOP] = torch.tensor([at, below, 0.9])
    assert at > 0.1 > below
    expected = [policy.decide(row, allow_exit=True) == STOP for row in probs]
    assert expected == [True, False, True] and policy.stops(probs).tolist() == expected
