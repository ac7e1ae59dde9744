"""The native steps (earlyexit.runtime.native, csrc/step.cpp), int8 and fp32: the torch lean steps' logits, cache,
state copy and greedy tokens, on odd shapes; built here (CI's machine has gcc), off with EARLYEXIT_NATIVE=0, and the
torch path with one stderr line where it cannot be built."""

import pytest
import torch

from earlyexit.runtime import native
from earlyexit.runtime.lean_step import LeanFp32Step, LeanInt8Step, attach_lean_step
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.native import NativeFp32Step, NativeInt8Step
from earlyexit.runtime.quantize import quantize_int8

from conftest import make_tiny_hf

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the [dev] extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# int8: bf16-rounded projection outputs; a sum in another order can land on the other side of a rounding boundary,
# one bf16 step (2^-8 relative) at that output, carried through the rest of the token. Measured: at most 0.002 on
# logits up to 1.2; the wrong activation (relu for gelu) differs by 0.04-0.45, far outside. fp32: the order of the
# sums alone (measured at most 2.4e-5 on the default model's logits of ~10).
CLOSE = {"int8": dict(rtol=1e-2, atol=5e-3), "fp32": dict(rtol=1e-5, atol=1e-5)}
STEPS = {"int8": (LeanInt8Step, NativeInt8Step), "fp32": (LeanFp32Step, NativeFp32Step)}


def tiny(kind: str, vocab: int, seed=0, n_layer=2, n_embd=48, n_head=4, activation="gelu_new"):
    hf = make_tiny_hf(vocab, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    hf.config.activation_function = activation
    model = GPT2.from_hf(hf)
    return quantize_int8(model) if kind == "int8" else attach_lean_step(model)


def tiny_int8(vocab: int, *args, **kwargs):
    return tiny("int8", vocab, *args, **kwargs)


def both(q, kind="int8"):
    """(torch lean step, native step) over the same model."""
    torch_step, native_step = STEPS[kind]
    return torch_step(q), native_step(q)


def test_the_extension_builds_here_and_models_take_it(tiny_tokenizer):
    assert native.extension() is not None, native._built.get("failure")
    assert type(tiny("int8", len(tiny_tokenizer)).lean) is NativeInt8Step
    assert type(tiny("fp32", len(tiny_tokenizer)).lean) is NativeFp32Step


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from([(16, 1), (32, 2), (48, 4), (64, 4), (80, 5), (96, 3)]), n_layer=st.integers(1, 3),
       prompt=st.integers(1, 12), steps=st.integers(1, 6), activation=st.sampled_from(["gelu_new", "relu"]),
       seed=st.integers(0, 3), kind=st.sampled_from(["int8", "fp32"]))
def test_native_logits_and_cache_match_the_torch_lean_step(tiny_tokenizer, shape, n_layer, prompt, steps, activation, seed, kind):
    n_embd, n_head = shape
    q = tiny(kind, len(tiny_tokenizer), seed, n_layer, n_embd, n_head, activation)
    ref, nat = both(q, kind)
    caches = [q.new_cache(1, prompt + steps), q.new_cache(1, prompt + steps)]
    tokens = torch.randint(0, len(tiny_tokenizer), (prompt + steps,), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        for pos, token in enumerate(tokens.tolist()):  # teacher-forced: both read the same tokens
            a, b = ref.logits(token, caches[0], pos), nat.logits(token, caches[1], pos)
            assert a.shape == b.shape == (1, q.dims.vocab_size)
            torch.testing.assert_close(b, a, **CLOSE[kind])
    torch.testing.assert_close(caches[1].k, caches[0].k, **CLOSE[kind])
    torch.testing.assert_close(caches[1].v, caches[0].v, **CLOSE[kind])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_greedy_is_the_argmax_of_its_reranked_candidates_and_follows_torch(tiny_tokenizer, seed):
    q = tiny_int8(len(tiny_tokenizer), seed, n_layer=3)
    ref, nat = both(q)
    c_ref, c_nat, c_logits = (q.new_cache(1, 40) for _ in range(3))
    t_ref = t_nat = t_logits = 5
    agree = 0
    with torch.inference_mode():
        for pos in range(30):
            t_ref, t_nat = ref.greedy(t_ref, c_ref, pos), nat.greedy(t_nat, c_nat, pos)
            logits = nat.logits(t_logits, c_logits, pos)[0]
            top = logits.topk(q.rerank).indices
            t_logits = int(top[logits[top].argmax()])  # greedy's rule, over the logits it returns
            assert t_nat == t_logits
            agree += t_ref == t_nat
    assert agree >= 27  # the same tokens but where a near-tie falls the other way (it never did over these seeds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_fp32_greedy_is_the_argmax_of_its_logits_and_the_torch_steps_token(tiny_tokenizer, seed):
    model = tiny("fp32", len(tiny_tokenizer), seed, n_layer=3)
    ref, nat = both(model, "fp32")
    c_ref, c_nat, c_logits = (model.new_cache(1, 40) for _ in range(3))
    t_ref = t_nat = t_logits = 5
    with torch.inference_mode():
        for pos in range(30):
            t_ref, t_nat = ref.greedy(t_ref, c_ref, pos), nat.greedy(t_nat, c_nat, pos)
            t_logits = int(nat.logits(t_logits, c_logits, pos)[0].argmax())
            assert t_ref == t_nat == t_logits


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_native_state_copy_matches_the_torch_one(tiny_tokenizer, kind):
    q = tiny(kind, len(tiny_tokenizer), n_layer=3)
    ref, nat = both(q, kind)
    h = torch.randn(1, q.dims.n_embd, generator=torch.Generator().manual_seed(0))
    caches = [q.new_cache(1, 8), q.new_cache(1, 8)]
    ref.embed(1, 0), nat.embed(1, 0)  # gather
    for i in range(3):
        ref.fill_kv(i, h, caches[0], 5)
        nat.fill_kv(i, h, caches[1], 5)
    torch.testing.assert_close(caches[1].k, caches[0].k, **CLOSE[kind])
    torch.testing.assert_close(caches[1].v, caches[0].v, **CLOSE[kind])
    assert caches[1].k[:, :, :, 5].abs().sum() > 0 and caches[1].k[:, :, :, :5].abs().sum() == 0  # that position only


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_a_block_does_not_change_the_stream_it_was_given(tiny_tokenizer, kind):
    q = tiny(kind, len(tiny_tokenizer))
    x = q.lean.embed(3, 0)
    before = x.clone()
    y = q.lean.block(0, x, q.new_cache(1, 4), 0)
    assert torch.equal(x, before) and not torch.equal(y, before)


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_a_row_view_of_a_batched_cache_is_written_in_its_row(tiny_tokenizer, kind):
    q = tiny(kind, len(tiny_tokenizer))
    alone, batched = q.new_cache(1, 6), q.new_cache(3, 6)
    for pos, token in enumerate([4, 9, 2]):
        q.lean.logits(token, alone, pos)
        q.lean.logits(token, batched.row(1), pos)
    assert torch.equal(batched.k[:, 1:2], alone.k) and torch.equal(batched.v[:, 1:2], alone.v)
    assert batched.k[:, 0].abs().sum() == 0 and batched.k[:, 2].abs().sum() == 0


def test_misuse_is_refused_by_the_extension_not_a_crash(tiny_tokenizer):
    q = tiny_int8(len(tiny_tokenizer))
    x = q.lean.embed(3, 0)
    cache = q.new_cache(1, 4)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        q.lean.native.blocks(x, cache.k, cache.v, 4, 0, 1)
    with pytest.raises(RuntimeError, match="blocks out of range"):
        q.lean.native.blocks(x, cache.k, cache.v, 0, 0, 9)
    with pytest.raises(RuntimeError, match="residual stream"):
        q.lean.native.blocks(x.double(), cache.k, cache.v, 0, 0, 1)
    with pytest.raises(RuntimeError, match="KV cache"):
        q.lean.native.blocks(x, cache.k[:1], cache.v, 0, 0, 1)


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_threads_decoding_at_once_match_one_at_a_time(tiny_tokenizer, kind):
    from concurrent.futures import ThreadPoolExecutor

    q = tiny(kind, len(tiny_tokenizer), n_layer=3)

    def decode(seed):
        cache, token, out = q.new_cache(1, 40), seed, []
        for pos in range(40):
            token = q.lean.greedy(token, cache, pos)
            out.append(token)
        return out

    alone = [decode(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(decode, range(4))) == alone


def test_earlyexit_native_0_keeps_the_torch_steps(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_NATIVE", "0")
    assert type(tiny("int8", len(tiny_tokenizer)).lean) is LeanInt8Step
    assert type(tiny("fp32", len(tiny_tokenizer)).lean) is LeanFp32Step


def test_a_failed_build_falls_back_to_torch_with_one_line(tiny_tokenizer, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(cpp, "load", no_compiler)
    q = tiny_int8(len(tiny_tokenizer))
    assert type(q.lean) is LeanInt8Step
    assert type(tiny("fp32", len(tiny_tokenizer)).lean) is LeanFp32Step
    err = capsys.readouterr().err
    assert err.count("native step unavailable (Ninja is required to load C++ extensions); using the torch path") == 1
    tiny_int8(len(tiny_tokenizer))
    assert "unavailable" not in capsys.readouterr().err  # said once


@pytest.mark.parametrize("seed", [0, 1])
def test_the_native_reranked_head_is_torchs_within_bf16_rounding(tiny_tokenizer, seed):
    from earlyexit.runtime.quantize import RerankedHead, reranked_projection

    model = tiny("fp32", len(tiny_tokenizer), seed)
    head = RerankedHead(model.head_weight)
    z = torch.randn(1, model.dims.n_embd, generator=torch.Generator().manual_seed(seed))
    got = head(z)
    assert head.native.built  # the C++ head took the row
    want = reranked_projection(head.int8, head.rows, z, head.rerank)
    torch.testing.assert_close(got, want, **CLOSE["int8"])
    top = want.topk(head.rerank).indices[0]
    torch.testing.assert_close(got[0, top], want[0, top], rtol=1e-6, atol=1e-6)  # rescored: fp32 dot products
    assert head(z.expand(3, -1)).shape == (3, model.dims.vocab_size)  # rows > 1: the torch path
    q = quantize_int8(model)
    torch.testing.assert_close(q.project(z), reranked_projection(q.int8_head, model.head_weight, z, q.rerank), **CLOSE["int8"])


@pytest.mark.parametrize("kind,shape", [("fp32", (48, 4)), ("fp32", (80, 5)), ("fp32", (40, 2)), ("int8", (48, 4)), ("int8", (64, 2))])
def test_a_window_is_the_single_token_steps_bit_for_bit(tiny_tokenizer, kind, shape):
    """Lossless mode verifies its drafts in one window: each row must be what full mode computes one token at a time,
    so that lossless writes full's tokens by construction, not by luck of rounding."""
    model = tiny(kind, len(tiny_tokenizer), 1, 3, *shape)
    tokens = torch.randint(0, len(tiny_tokenizer), (20,), generator=torch.Generator().manual_seed(2)).tolist()
    one, many = model.new_cache(1, 24), model.new_cache(1, 24)
    with torch.inference_mode():
        for pos, token in enumerate(tokens[:7]):
            model.lean.logits(token, one, pos), model.lean.logits(token, many, pos)
        seq = torch.cat([model.lean.logits(token, one, 7 + i) for i, token in enumerate(tokens[7:])])
        win = model.lean.window(tokens[7:], many, 7)
    assert torch.equal(win, seq) and torch.equal(many.k, one.k) and torch.equal(many.v, one.v)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        model.lean.window(tokens, model.new_cache(1, 19), 0)


def test_lossless_verifies_through_the_native_window(tiny_tokenizer, monkeypatch):
    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.speculative import Lossless

    model = tiny("fp32", len(tiny_tokenizer), 0, 2)
    calls = []
    real = model.lean.window
    monkeypatch.setattr(model.lean, "window", lambda *a: calls.append(len(a[0])) or real(*a))
    settings = GenerationSettings(max_new_tokens=24)
    policy = Lossless(model, ExitHeads.for_backbone(model), max_draft=5)
    lossless = complete(model, tiny_tokenizer, "def add(a, b):", settings, policy=policy)
    assert calls and max(calls) > 1
    assert lossless.token_ids == complete(model, tiny_tokenizer, "def add(a, b):", settings).token_ids


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_a_model_moved_off_the_cpu_takes_the_torch_lean_path(tiny_tokenizer, kind, monkeypatch):
    """`model.to("cuda")` replaces the tensors the native step read: it regathers, finds the model off the CPU and
    runs the torch lean step's ops instead (simulated here: no GPU)."""
    q = tiny(kind, len(tiny_tokenizer))
    ref = STEPS[kind][0](q)
    monkeypatch.setattr(native, "_on_cpu_fp32", lambda model: False)
    q.wte.weight = torch.nn.Parameter(q.wte.weight.detach().clone(), requires_grad=False)  # what a move does
    a, b = q.new_cache(1, 6), q.new_cache(1, 6)
    for pos, token in enumerate([4, 9, 2]):
        torch.testing.assert_close(q.lean.logits(token, a, pos), ref.logits(token, b, pos), rtol=0, atol=0)
    assert q.lean.native is None and q.lean.window([1, 2], a, 3) is None
