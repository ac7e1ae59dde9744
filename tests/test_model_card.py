"""The model card is computed by its script from a real (tiny) training run, not written by hand."""

import json

from earlyexit import model_card
from earlyexit.train_lm import main as train_main

from test_train_lm import make_corpus, tiny_recipe


def test_model_card_from_a_tiny_run(tmp_path):
    corpus = make_corpus(tmp_path)
    assert train_main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    export = tmp_path / "run/export"
    small = ["loss_windows=4", "seq_len=16", "line_examples=3", "token_examples=3", "target_tokens=4", "max_line_tokens=5",
             "sample_max_new_tokens=4", "sample_prompts=['def f(', 'class A:']"]
    assert model_card.main(["--model", str(export), "--log", str(tmp_path / "run/log.jsonl"), *small]) == 0
    result = json.loads((export / "eval.json").read_text())
    for split in ("validation", "test"):
        assert result[split]["loss"] > 0 and 0 <= result[split]["top1"] <= 1 and result[split]["tokens"] > 0
    assert result["line_completion"]["examples"] == 3 and result["token_completion"]["examples"] == 3
    assert [s["prompt"] for s in result["samples"]] == ["def f(", "class A:"]
    card = (export / "MODEL_CARD.md").read_text()
    assert f"{result['validation']['loss']:.3f}" in card and (export / "training_curve.png").exists()


def test_model_card_refuses_a_model_without_training_state(tmp_path, tiny_model_dir, capsys):
    assert model_card.main(["--model", str(tiny_model_dir)]) == 2
    assert "training_state.json" in capsys.readouterr().err
