"""The embedded default model: ships, loads the standard way, and our runtime reproduces it exactly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from earlyexit.runtime.decoding import GenerationSettings, complete
from earlyexit.cli import main
from earlyexit.runtime.loading import DEFAULT_MODEL_DIR
from earlyexit.runtime.model import GPT2

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\nclass Config:\n    def __init__(self, path):\n        self."]


@pytest.fixture(scope="module")
def hf_and_tok():
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def test_ships_within_budget_with_card_and_tokenizer():
    weights = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert 0 < weights <= 50_000_000
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert "validation" in card and "perplexity" in card and "tokens seen" in card
    state = json.loads((DEFAULT_MODEL_DIR / "training_state.json").read_text())
    assert state["config"]["n_layer"] >= 12 and state["tokens_seen"] > 0


def test_our_logits_match_transformers(hf_and_tok):
    hf, tok = hf_and_tok
    ours = GPT2.from_hf(hf)
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids, ours.new_cache(1), 0)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_greedy_equals_transformers_generate(hf_and_tok):
    hf, tok = hf_and_tok
    ours = GPT2.from_hf(hf)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert complete(ours, tok, prompt, GenerationSettings(max_new_tokens=24)).token_ids == ref


def test_cli_completes_with_the_default_model(capsys):
    assert main(["def fibonacci(n):", "--max-new-tokens", "8", "--json"]) == 0  # early-exit by default: the model ships with heads
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) >= 1 and result["finish_reason"] in ("eos", "max_tokens", "stop") and result["mode"] == "early-exit"


@pytest.mark.parametrize("prompt,word", [("    ret", "urn"), ("        self.items = []\n\n    def push(self, item):\n        self.items.app", "end"),
                                         ("import collec", "tions"),
                                         ("def area(r):\n    \"\"\"Retu", "rn"),
                                         ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    ", "def ")])
def test_token_healing_on_prompts_cut_inside_a_word(hf_and_tok, prompt, word):
    hf, tok = hf_and_tok
    ours = GPT2.from_hf(hf)
    c = complete(ours, tok, prompt, GenerationSettings(max_new_tokens=6, token_healing=True))
    assert c.healed_prefix and tok.decode(c.token_ids).startswith(c.healed_prefix)
    assert tok.decode(tok.encode(prompt)[:c.prompt_tokens] + c.token_ids) == prompt + c.text
    assert c.text.startswith(word)  # the word the prompt began, finished
