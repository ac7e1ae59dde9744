"""The lean int8 single-token step (earlyexit.runtime.lean_step): the generic int8 path's logits, tokens and cache."""

import pytest
import torch

from earlyexit.runtime.lean_step import LeanInt8Step
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import FullDepth
from earlyexit.runtime.quantize import quantize_int8

from conftest import make_tiny_hf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_step_matches_the_generic_int8_path(tiny_tokenizer, seed):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=48, seed=seed))
    q = quantize_int8(model)
    assert isinstance(q.lean, LeanInt8Step)
    q.lean = LeanInt8Step(q)  # the torch step, exactly the generic path's ops (the native one: tests/test_native_step.py)
    prompt = torch.randint(0, len(tiny_tokenizer), (1, 7 + seed), generator=torch.Generator().manual_seed(seed))
    caches = {name: model.new_cache(1, 40) for name in ("generic", "logits", "greedy")}
    with torch.inference_mode():
        for cache in caches.values():
            model(prompt, cache, 0)
        tok = {name: int(prompt[0, -1]) for name in caches}
        for pos in range(prompt.shape[1], prompt.shape[1] + 20):
            ref = q(torch.tensor([[tok["generic"]]]), caches["generic"], pos)[0, -1]  # GPT2.forward: the generic path
            lean = q.lean.logits(tok["logits"], caches["logits"], pos)[0]
            assert torch.allclose(lean, ref, atol=1e-4, rtol=1e-4)
            tok["generic"], tok["logits"] = int(ref.argmax()), int(lean.argmax())
            tok["greedy"] = q.lean.greedy(tok["greedy"], caches["greedy"], pos)
            assert tok["generic"] == tok["logits"] == tok["greedy"]
    written = slice(0, prompt.shape[1] + 20)
    for name in ("logits", "greedy"):
        assert torch.allclose(caches[name].k[:, :, :, written], caches["generic"].k[:, :, :, written], atol=1e-5)
        assert torch.allclose(caches[name].v[:, :, :, written], caches["generic"].v[:, :, :, written], atol=1e-5)


def test_full_depth_decoding_of_an_int8_copy_takes_the_lean_path(tiny_tokenizer, monkeypatch):
    q = quantize_int8(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2)))
    calls = []
    monkeypatch.setattr(q.lean, "logits", lambda *a: calls.append(a) or torch.zeros(1, q.dims.vocab_size))
    cache = q.new_cache(1, 16)
    FullDepth().step(q, torch.tensor([[3]]), cache, 5, 2)
    assert len(calls) == 1
    FullDepth().step(q, torch.tensor([[3, 4]]), cache, 5, 2)  # two tokens: the generic path
    assert len(calls) == 1


def test_the_lean_path_follows_the_model_to_new_tensors(tiny_tokenizer):
    q = quantize_int8(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2)))
    cache = q.new_cache(1, 16)
    before = q.lean.logits(3, cache, 0)
    q.wte.weight = torch.nn.Parameter(q.wte.weight.detach() * 2, requires_grad=False)  # what a move to another device does
    after = q.lean.logits(3, q.new_cache(1, 16), 0)
    assert not torch.allclose(before, after)


def test_models_the_fused_op_cannot_take_have_no_lean_path(tiny_tokenizer):
    odd = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=40, n_head=4))  # 40 % 16 != 0
    assert quantize_int8(odd).lean is None
    assert not LeanInt8Step.supports(odd)  # fp32: not an int8 copy
    assert quantize_int8(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer))), head=False).lean is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fp32_lean_step_is_the_generic_path_bit_for_bit(tiny_tokenizer, seed):
    from earlyexit.runtime.lean_step import LeanFp32Step, attach_lean_step

    model = attach_lean_step(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=48, seed=seed)))
    assert isinstance(model.lean, LeanFp32Step)
    model.lean = LeanFp32Step(model)  # the torch step (the native one, within fp32 rounding: tests/test_native_step.py)
    prompt = torch.randint(0, len(tiny_tokenizer), (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
    generic, lean = model.new_cache(1, 40), model.new_cache(1, 40)
    with torch.inference_mode():
        model(prompt, generic, 0)
        model(prompt, lean, 0)
        tok = int(prompt[0, -1])
        for pos in range(prompt.shape[1], prompt.shape[1] + 20):
            ref = model.logits(model.hidden(torch.tensor([[tok]]), generic, pos)[:, -1])
            got = model.lean.logits(tok, lean, pos)
            assert torch.equal(got, ref)
            tok = int(ref.argmax())
    assert torch.equal(lean.k, generic.k) and torch.equal(lean.v, generic.v)
    assert LeanFp32Step.supports(model) and not LeanFp32Step.supports(quantize_int8(model))


def test_full_mode_of_a_loaded_fp32_model_takes_the_lean_path_and_writes_transformers_greedy_tokens(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.lean_step import LeanFp32Step
    from earlyexit.runtime.loading import load_runtime_model

    model, tok = load_runtime_model(tiny_model_dir)
    assert isinstance(model.lean, LeanFp32Step)
    calls = []
    real = model.lean.logits
    monkeypatch.setattr(model.lean, "logits", lambda *a: calls.append(1) or real(*a))
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=None)[0, ids.shape[1]:]
    got = complete(model, tok, ids[0].tolist(), GenerationSettings(max_new_tokens=12), policy=FullDepth())
    assert got.token_ids == ref.tolist()[:len(got.token_ids)] and len(calls) >= len(got.token_ids) - 1


def test_lossless_drafting_full_depth_with_the_model_itself_takes_the_fp32_lean_step_and_stays_full(tiny_model_dir):
    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.loading import load_runtime_model
    from earlyexit.runtime.speculative import Lossless

    model, tok = load_runtime_model(tiny_model_dir)
    policy = Lossless(model, ExitHeads.for_backbone(model, rank=2), exit_threshold=1.0, draft="same")
    assert policy.lean is model.lean  # drafts at full depth, one token at a time: the lean step's greedy
    settings = GenerationSettings(max_new_tokens=10)
    full = complete(model, tok, "def add(a, b):", settings, policy=FullDepth())
    assert complete(model, tok, "def add(a, b):", settings, policy=policy).token_ids == full.token_ids


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_the_per_layer_tensors_are_gathered_once_not_per_token(tiny_tokenizer, kind):
    from earlyexit.runtime.lean_step import attach_lean_step

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=64))
    m = quantize_int8(model) if kind == "int8" else attach_lean_step(model)
    gathered = []
    original = m.lean._gather
    m.lean._gather = lambda: gathered.append(1) or original()
    cache = m.new_cache(1, 16)
    for pos in range(6):
        m.lean.logits(3, cache, pos)
    assert len(gathered) == 1
    m.wte.weight = torch.nn.Parameter(m.wte.weight.detach().clone(), requires_grad=False)  # new tensors: gathered again
    m.lean.logits(3, cache, 6)
    assert len(gathered) == 2
