"""Weight-only int8 copies (earlyexit.runtime.quantize): close to fp32, never touching the original."""

import pytest
import torch

from earlyexit.runtime.model import GPT2
from earlyexit.runtime.quantize import Int8GPT2, Int8Linear, quantize_int8, quantize_rows
from earlyexit.runtime.speculative import draft_model

from conftest import make_tiny_hf


@pytest.mark.parametrize("in_features", [16, 24, 37, 48, 256])  # multiples of 16 take the fused op, others the fallback
@pytest.mark.parametrize("lead", [(1, 1), (2, 3), (5,)])
def test_int8_linear_is_close_to_fp32(in_features, lead):
    g = torch.Generator().manual_seed(in_features)
    linear = torch.nn.Linear(in_features, 3 * in_features + 5)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
    x = torch.randn(*lead, in_features, generator=g)
    q = Int8Linear.from_linear(linear)
    y, ref = q(x), linear(x).detach()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # int8 weights (per-row scale) and bf16 activations: about 1% of the output's scale
    assert (y - ref).abs().max() <= 0.03 * ref.abs().max()
    # what runs is exactly int8 * scale: the dequantized weight reproduces it up to bf16 rounding of x
    exact = torch.nn.functional.linear(x.bfloat16().float(), q.weight, q.bias)
    assert torch.allclose(y, exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


def test_quantize_rows_is_symmetric_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 1.0, -127.0]])
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert q[1].abs().sum() == 0  # an all-zero row stays zero, no division by zero
    assert torch.allclose(q.float() * scale.float()[:, None], w, atol=0.02)


def test_quantized_model_is_close_and_leaves_the_original_alone(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert isinstance(q, Int8GPT2) and type(model) is GPT2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(1, len(tiny_tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    ref = model(ids, model.new_cache(2, 32), 0)
    got = q(ids, q.new_cache(2, 32), 0)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_draft_model_choice(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=1))
    assert draft_model(model, "same") is model
    assert isinstance(draft_model(model, "auto"), Int8GPT2)  # fp32 on the CPU: int8 drafts
    wide = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=1), dtype=torch.float64)
    assert draft_model(wide, "auto") is wide


def test_rerank_gives_the_fp32_heads_argmax(tiny_tokenizer):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=5))
    z = torch.randn(64, model.dims.n_embd, generator=torch.Generator().manual_seed(1))
    exact = model.project(z)
    plain, reranked = quantize_int8(model, rerank=0), quantize_int8(model, rerank=8)
    assert torch.equal(reranked.project(z).argmax(-1), exact.argmax(-1))
    # the winning logit is the fp32 one itself; the rest stay int8
    assert torch.allclose(reranked.project(z).max(-1).values, exact.max(-1).values, atol=1e-6)
    assert not torch.equal(plain.project(z), exact)


@pytest.mark.parametrize("in_features", [37, 48])  # the fallback and the fused op
def test_int8_outputs_are_the_forward_rows(in_features):
    linear = torch.nn.Linear(in_features, 3 * in_features)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, in_features, generator=torch.Generator().manual_seed(1))
    # state copying asks for the K/V rows only: the same int8 arithmetic as the whole projection, sliced
    assert torch.equal(q.outputs(x, in_features, 3 * in_features), q(x)[..., in_features:])


def test_int8_copy_refuses_a_dtype_change_but_moves_devices(tiny_tokenizer):
    from earlyexit.errors import EarlyExitError

    q = quantize_int8(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, seed=1)))
    for convert in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.h[0].attn.c_attn.float()):
        with pytest.raises(EarlyExitError, match="must stay"):
            convert(q)
    assert q.h[0].attn.c_attn.scale.dtype == torch.bfloat16 and q.wte.weight.dtype == torch.float32
    head = q.head_weight
    assert q.head_weight is head and torch.equal(head, q.int8_head.weight)  # dequantized once
    assert q.to("cpu") is q and q.head_weight is not head  # a device move drops the cached copy
