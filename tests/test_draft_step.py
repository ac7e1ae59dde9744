"""The lean int8 draft step (earlyexit.draft_step): the generic int8 path's tokens and cache, fewer ops."""

import pytest
import torch

from earlyexit.draft_step import LeanDraft
from earlyexit.model import GPT2
from earlyexit.quantize import quantize_int8

from conftest import make_tiny_hf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_draft_matches_the_generic_int8_step(tiny_tokenizer, seed):
    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=3, n_embd=48, seed=seed))
    q = quantize_int8(model)
    assert LeanDraft.supports(q)
    lean = LeanDraft(q)
    prompt = torch.randint(0, len(tiny_tokenizer), (1, 7 + seed), generator=torch.Generator().manual_seed(seed))
    ref_cache, lean_cache = model.new_cache(1, 40), model.new_cache(1, 40)
    with torch.inference_mode():
        model(prompt, ref_cache, 0)
        model(prompt, lean_cache, 0)
        ref_tok = lean_tok = int(prompt[0, -1])
        for pos in range(prompt.shape[1], prompt.shape[1] + 20):
            ref_tok = int(q(torch.tensor([[ref_tok]]), ref_cache, pos)[0, -1].argmax())
            lean_tok = lean.draft(lean_tok, lean_cache, pos)
            assert lean_tok == ref_tok
    written = slice(0, prompt.shape[1] + 20)
    assert torch.allclose(lean_cache.k[:, :, :, written], ref_cache.k[:, :, :, written], atol=1e-5)
    assert torch.allclose(lean_cache.v[:, :, :, written], ref_cache.v[:, :, :, written], atol=1e-5)


def test_models_the_fused_op_cannot_take_use_the_generic_path(tiny_tokenizer):
    odd = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=2, n_embd=40, n_head=4))  # 40 % 16 != 0
    assert not LeanDraft.supports(quantize_int8(odd))
    assert not LeanDraft.supports(odd)  # fp32: not an int8 copy
    assert not LeanDraft.supports(quantize_int8(GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer))), head=False))
