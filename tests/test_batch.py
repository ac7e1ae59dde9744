"""Batched decoding equals decoding each prompt alone, row for row, in every policy that batches."""

import pytest
import torch

from earlyexit.runtime.batch import complete_batch
from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.heads import ExitHeads, Thresholds
from earlyexit.runtime.model import GPT2
from earlyexit.runtime.policies import EarlyExit, FullDepth
from earlyexit.runtime.speculative import Lossless

from conftest import make_tiny_hf

PROMPTS = ["def add(a, b):", "class Stack:\n    def __init__(self):\n        self.items = []\n", "for i in", "import os\nimport sys\n\n"]


def tiny(tokenizer, seed):
    hf = make_tiny_hf(len(tokenizer), seed=seed, n_layer=4, n_positions=128)
    with torch.no_grad():  # peaked logits: greedy ties between rows' float orders stay improbable
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() >= 2 else None
    return GPT2.from_hf(hf)


def random_heads(model, seed):
    torch.manual_seed(seed)
    heads = ExitHeads.for_backbone(model, rank=4)
    with torch.no_grad():
        heads.cls.weight.normal_(0, 0.5)
        heads.layer_bias.normal_(0, 1.0)
        heads.prev_bias.normal_(0, 1.0)
        heads.layer_bias[:, 2] -= 3.0  # stops rare enough that most rows write a few tokens first
    return heads.eval()


def assert_rows_equal(model, tok, prompts, settings, policy):
    alone = [complete(model, tok, p, settings, policy=policy) for p in prompts]
    together = complete_batch(model, tok, prompts, settings, policy=policy)
    assert len(together) == len(prompts)
    for a, b in zip(alone, together):
        assert (b.token_ids, b.exit_layers, b.finish_reason, b.text) == (a.token_ids, a.exit_layers, a.finish_reason, a.text)
    return together


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_depth_batch_equals_batch_one(tiny_tokenizer, seed):
    model = tiny(tiny_tokenizer, seed)
    out = assert_rows_equal(model, tiny_tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12), FullDepth())
    assert all(layers == [4] * len(c.token_ids) for c in out for layers in [c.exit_layers])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_early_exit_batch_equals_batch_one_with_exits_and_stops(tiny_tokenizer, seed):
    model = tiny(tiny_tokenizer, seed)
    policy = EarlyExit(model, random_heads(model, seed), Thresholds(exit=0.3, stop=0.6))
    out = assert_rows_equal(model, tiny_tokenizer, PROMPTS * 2, GenerationSettings(max_new_tokens=10), policy)
    layers = {n for c in out for n in c.exit_layers}
    assert len(layers) > 1  # rows really left at different layers in the same steps
    assert any(c.token_ids for c in out)


def test_batch_keeps_settings_per_row(tiny_tokenizer):
    model = tiny(tiny_tokenizer, 5)
    settings = GenerationSettings(max_new_tokens=8, stop_strings=("\n",), token_healing=True)
    out = assert_rows_equal(model, tiny_tokenizer, ["self.ite", "ret", "import o"], settings, FullDepth())
    assert all(c.finish_reason in ("stop_string", "max_tokens", "eos") for c in out)


@pytest.mark.parametrize("seed,max_draft", [(0, 1), (1, 2), (2, 4), (3, 8)])
def test_lossless_batch_equals_batch_one_and_full(tiny_tokenizer, seed, max_draft):
    model = tiny(tiny_tokenizer, seed)
    heads = random_heads(model, seed)
    settings = GenerationSettings(max_new_tokens=13)
    prompts = PROMPTS * 2
    full = [c.token_ids for c in complete_batch(model, tiny_tokenizer, prompts, settings)]
    policy = Lossless(model, heads, exit_threshold=0.3, max_draft=max_draft)
    alone = [complete(model, tiny_tokenizer, p, settings, policy=policy) for p in prompts]
    together = complete_batch(model, tiny_tokenizer, prompts, settings, policy=policy)
    for a, b, f in zip(alone, together, full):
        assert b.token_ids == a.token_ids == f  # the full model's greedy tokens, row for row
        assert (b.exit_layers, b.speculation, b.finish_reason) == (a.exit_layers, a.speculation, a.finish_reason)
    assert sum(c.speculation["drafted"] for c in together) > 0


def test_batch_refuses_what_it_cannot_do(tiny_tokenizer):
    from transformers import LogitsProcessorList

    model = tiny(tiny_tokenizer, 0)
    with pytest.raises(EarlyExitError, match="logits processors"):
        complete_batch(model, tiny_tokenizer, PROMPTS, logits_processor=LogitsProcessorList(), policy=Lossless(model, random_heads(model, 0)))
    with pytest.raises(EarlyExitError, match="non-empty list"):
        complete_batch(model, tiny_tokenizer, [])
    with pytest.raises(EarlyExitError, match="prompt is empty"):
        complete_batch(model, tiny_tokenizer, ["x", ""])


def test_default_model_batch_equals_batch_one():
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import DEFAULT_MODEL_DIR, load_runtime_model

    model, tok = load_runtime_model(DEFAULT_MODEL_DIR)
    heads = load_heads(DEFAULT_MODEL_DIR, model)
    prompts = ["import os\n", "def fibonacci(n):\n    ", "class Stack:\n    def __init__(self):\n        self.", "x = [i for i in range("]
    settings = GenerationSettings(max_new_tokens=12)
    assert_rows_equal(model, tok, prompts, settings, EarlyExit(model, heads, Thresholds(exit=0.5, stop=0.9)))
    full = [c.token_ids for c in complete_batch(model, tok, prompts, settings)]
    assert [c.token_ids for c in complete_batch(model, tok, prompts, settings, policy=Lossless(model, heads, exit_threshold=0.5))] == full


def test_lossless_batch_with_stops_equals_batch_one(tiny_tokenizer):
    reasons = []
    for seed in range(4):
        model = tiny(tiny_tokenizer, seed)
        heads = random_heads(model, seed)
        settings = GenerationSettings(max_new_tokens=10)
        policy = Lossless(model, heads, exit_threshold=0.3, max_draft=1 + seed, stop_threshold=0.6)
        out = assert_rows_equal(model, tiny_tokenizer, PROMPTS * 2, settings, policy)
        no_exits = EarlyExit(model, heads, Thresholds(exit=1.0, stop=0.6))  # what lossless with stops reproduces
        assert [c.token_ids for c in out] == [complete(model, tiny_tokenizer, p, settings, policy=no_exits).token_ids for p in PROMPTS * 2]
        reasons += [c.finish_reason for c in out]
    assert "stop" in reasons and set(reasons) - {"stop"}, reasons  # some rows stopped, others wrote to the end
