"""Our GPT-2 forward against transformers' on random tiny models."""

import pytest
import torch

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.model import GPT2, GPT2Dims

from conftest import make_tiny_hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("seed,n_embd,n_head,T", [(0, 48, 4, 13), (1, 40, 5, 1), (2, 64, 2, 31)])
def test_full_sequence_logits_match_transformers(seed, n_embd, n_head, T):
    hf = make_tiny_hf(vocab_size=211, seed=seed, n_embd=n_embd, n_head=n_head)
    ours = GPT2.from_hf(hf)
    ids = torch.randint(0, 211, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(ours(ids, ours.new_cache(2), 0), ref) < 1e-4


def test_incremental_decoding_matches_one_full_pass():
    hf = make_tiny_hf(vocab_size=97, seed=3)
    ours = GPT2.from_hf(hf)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = ours.new_cache(1, capacity=20)
    parts = [ours(ids[:, :5], cache, 0), ours(ids[:, 5:9], cache, 5)]  # a prefix, then a chunk after it
    parts += [ours(ids[:, t:t + 1], cache, t) for t in range(9, 20)]  # then one token at a time
    assert rel_err(torch.cat(parts, dim=1), ref) < 1e-4


def test_untied_lm_head_is_kept():
    hf = make_tiny_hf(vocab_size=50, seed=4)
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
    ours = GPT2.from_hf(hf)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert rel_err(ours(ids, ours.new_cache(1), 0), hf(ids).logits) < 1e-4


def test_non_gpt2_config_is_refused():
    class FakeConfig:
        model_type = "llama"

    with pytest.raises(EarlyExitError, match="expected a GPT-2 model"):
        GPT2Dims.from_hf_config(FakeConfig())


@pytest.mark.parametrize("seed,prompt_len,max_new", [(0, 1, 20), (1, 7, 33), (2, 16, 12), (5, 40, 50)])
def test_greedy_tokens_equal_transformers_generate(tiny_tokenizer, seed, prompt_len, max_new):
    eos = tiny_tokenizer.eos_token_id
    hf = make_tiny_hf(len(tiny_tokenizer), seed=seed, eos=eos)
    ours = GPT2.from_hf(hf)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, len(tiny_tokenizer), (prompt_len,), generator=g).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new, pad_token_id=eos)[0, prompt_len:].tolist()
    got = complete(ours, tiny_tokenizer, prompt, GenerationSettings(max_new_tokens=max_new))
    assert got.token_ids == ref
    assert got.finish_reason == ("eos" if ref[-1] == eos else "max_tokens")
    assert got.exit_layers == [hf.config.n_layer] * len(ref)
