"""Interpreter tier: every Triton kernel against its PyTorch reference on odd shapes, fp32 and fp16.

Triton runs here through its interpreter (TRITON_INTERPRET=1, set in conftest.py before
triton is imported), which executes each program in Python: shapes are kept small and
launch parameters are set so that the multi-split, multi-tile paths are still exercised.
"""

import pytest
import torch

import earlyexit.kernels.dispatch as K
from earlyexit.kernels.exit_confidence import split_plan
from earlyexit.runtime.model import GPT2

from conftest import make_tiny_hf

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=1e-3, rtol=1e-3)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ln_params(d, seed):
    g = gen(seed)
    return torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g) * 0.1


def assert_confidence_close(got, ref, dtype):
    assert torch.equal(got.token, ref.token)
    for name in ("max_prob", "margin", "entropy", "lse"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **TOL[dtype], msg=name)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls that reach each Triton launcher, proving the kernel path ran."""
    calls = {}
    for name in ("exit_confidence_triton", "layer_check_triton", "state_copy_triton"):
        original = getattr(K, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, wrapper)
    return calls


# ----------------------------------------------------------------------------- exit confidence

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,d,V,block_v,target_programs",
    [
        (1, 40, 1000, 64, 8),  # batch 1, vocabulary split 8 ways, last tile partial
        (3, 33, 1000, 128, 3),  # B > 1, d not a power of two, one split per row
        (1, 24, 50257, 2048, 6),  # GPT-2's vocabulary, small d
        (2, 17, 5, 64, 4),  # fewer words than one tile
    ],
)
def test_exit_confidence_matches_reference(spy, dtype, B, d, V, block_v, target_programs):
    g = gen(B * 1000 + d)
    h = torch.randn(B, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * 0.4).to(dtype)
    ln_w, ln_b = ln_params(d, d)
    got = K.exit_confidence(h, ln_w, ln_b, W, backend="triton", block_v=block_v, target_programs=target_programs)
    assert spy == {"exit_confidence_triton": 1} and K.last_backend["exit_confidence"] == "triton"
    assert_confidence_close(got, K.exit_confidence_reference(h, ln_w, ln_b, W), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,d,V,block_v,target_programs", [(1, 40, 1000, 64, 8), (3, 33, 777, 128, 2)])
def test_exit_confidence_of_an_already_normalised_vector_matches_reference(spy, dtype, B, d, V, block_v, target_programs):
    """The exit heads' vector (LN_l + adapter) goes to the head as it stands: no second layer norm."""
    g = gen(B * 7 + d)
    z = (torch.randn(B, d, generator=g) * 3).to(dtype)  # not unit-scaled: a layer norm would change the statistics
    W = (torch.randn(V, d, generator=g) * 0.4).to(dtype)
    got = K.exit_confidence(z, None, None, W, backend="triton", block_v=block_v, target_programs=target_programs)
    assert spy == {"exit_confidence_triton": 1}
    want = K.exit_confidence_reference(z, None, None, W)
    assert_confidence_close(got, want, dtype)
    logits = z.float() @ W.float().t()
    assert torch.equal(want.token, logits.argmax(-1))
    assert torch.allclose(want.max_prob, logits.softmax(-1).amax(-1), atol=1e-6)


def test_the_batch1_case_really_splits_the_vocabulary():
    split_size, n_splits = split_plan(B=1, V=50257, block_v=128, target_programs=512)
    assert n_splits > 100 and split_size % 128 == 0 and (n_splits - 1) * split_size < 50257 <= n_splits * split_size
    assert split_plan(B=512, V=50257, block_v=128, target_programs=512)[1] == 1


def test_exit_confidence_ties_pick_the_lowest_index_across_splits():
    d, V = 24, 1000
    g = gen(7)
    h = torch.randn(2, d, generator=g)
    ln_w, ln_b = torch.ones(d), torch.zeros(d)
    z = torch.nn.functional.layer_norm(h, (d,))
    W = torch.randn(V, d, generator=g) * 0.1
    W[[130, 900]] = z[0] * 0.5  # row 0: the same best logit in two different splits
    W[[40, 41]] = z[1] * 0.5  # row 1: the same best logit twice in one tile
    got = K.exit_confidence(h, ln_w, ln_b, W, backend="triton", block_v=64, target_programs=8)
    assert got.token.tolist() == [130, 40]
    torch.testing.assert_close(got.margin, torch.zeros(2), atol=1e-6, rtol=0)
    assert_confidence_close(got, K.exit_confidence_reference(h, ln_w, ln_b, W), torch.float32)


def test_exit_confidence_with_one_dominant_logit_stays_finite():
    d, V = 24, 3000
    h = torch.randn(1, d, generator=gen(8))
    z = torch.nn.functional.layer_norm(h, (d,))
    W = torch.randn(V, d, generator=gen(9)) * 0.05
    W[2999] = z[0] * 20  # logit ~ 20 * d = 480: every other probability underflows
    got = K.exit_confidence(h, torch.ones(d), torch.zeros(d), W, backend="triton", block_v=256, target_programs=4)
    assert got.token.item() == 2999 and all(torch.isfinite(t).all() for t in got)
    assert got.max_prob.item() == pytest.approx(1.0) and got.entropy.item() == pytest.approx(0.0, abs=1e-5)
    assert_confidence_close(got, K.exit_confidence_reference(h, torch.ones(d), torch.zeros(d), W), torch.float32)


# ----------------------------------------------------------------------------- layer check

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,d,with_extra", [(1, 40, False), (5, 77, True), (2, 256, True)])
def test_layer_check_matches_reference(spy, dtype, B, d, with_extra):
    g = gen(B + d)
    x, delta = torch.randn(B, d, generator=g).to(dtype), torch.randn(B, d, generator=g).to(dtype)
    ln_w, ln_b = ln_params(d, B)
    C, cb = torch.randn(3, d, generator=g), torch.randn(3, generator=g)
    extra = torch.randn(B, 3, generator=g) if with_extra else None
    h, probs = K.layer_check(x, delta, ln_w, ln_b, C, cb, extra, backend="triton")
    assert spy == {"layer_check_triton": 1}
    h_ref, probs_ref = K.layer_check_reference(x, delta, ln_w, ln_b, C, cb, extra)
    assert h.dtype == dtype and torch.equal(h, h_ref)
    torch.testing.assert_close(probs, probs_ref, **TOL[dtype])
    torch.testing.assert_close(probs.sum(-1), torch.ones(B), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- state copy

@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,n_embd,n_head,first,count,pos", [(1, 40, 5, 1, 3, 0), (3, 48, 4, 2, 2, 6), (2, 36, 3, 0, 4, 3)])
def test_state_copy_matches_reference_and_the_models_own_kv(spy, cache_dtype, B, n_embd, n_head, first, count, pos):
    model = GPT2.from_hf(make_tiny_hf(vocab_size=50, n_layer=4, n_embd=n_embd, n_head=n_head, seed=B))
    weights = K.stack_state_copy_weights(model.h)
    h = torch.randn(B, n_embd, generator=gen(pos))
    got, ref = model.new_cache(B, capacity=8), model.new_cache(B, capacity=8)
    got.k, got.v = got.k.to(cache_dtype), got.v.to(cache_dtype)
    ref.k, ref.v = ref.k.to(cache_dtype), ref.v.to(cache_dtype)
    K.state_copy(h, weights, got.k, got.v, first, count, pos, backend="triton", block_n=32, block_d=16)
    assert spy == {"state_copy_triton": 1}
    K.state_copy_reference(h, weights, ref.k, ref.v, first, count, pos)
    torch.testing.assert_close(got.k, ref.k, **TOL[cache_dtype])
    torch.testing.assert_close(got.v, ref.v, **TOL[cache_dtype])
    untouched = [layer for layer in range(4) if not first <= layer < first + count]
    assert got.k[untouched].abs().sum() == 0 and got.k[:, :, :, [p for p in range(8) if p != pos]].abs().sum() == 0
    layer = first + count - 1  # the reference equals what the block itself would compute from h
    k, v = model.h[layer].attn.kv(model.h[layer].ln_1(h[:, None]))
    torch.testing.assert_close(ref.k[layer, :, :, pos], k[:, :, 0].to(cache_dtype), **TOL[cache_dtype])
    torch.testing.assert_close(ref.v[layer, :, :, pos], v[:, :, 0].to(cache_dtype), **TOL[cache_dtype])


# ----------------------------------------------------------------------------- dispatcher

def test_dispatcher_uses_the_reference_for_cpu_tensors(spy):
    h = torch.randn(1, 8)
    K.exit_confidence(h, torch.ones(8), torch.zeros(8), torch.randn(20, 8))
    assert K.last_backend["exit_confidence"] == "torch" and spy == {}
    with pytest.raises(ValueError, match="backend must be one of"):
        K.exit_confidence(h, torch.ones(8), torch.zeros(8), torch.randn(20, 8), backend="cuda")
