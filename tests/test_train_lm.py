"""The training recipe end to end on a tiny corpus: tokenizer, steps, checkpoint, resume, export."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from earlyexit.train_lm import LMTrainConfig, batch_at, lr_at, main

from conftest import SAMPLE_CODE


def tiny_recipe(tmp_path, corpus, **extra):
    args = {
        "sources": f"[{corpus}]", "vocab_size": 300, "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
        "seq_len": 32, "batch_size": 2, "max_steps": 4, "warmup_steps": 1, "eval_interval": 2, "eval_windows": 4,
        "checkpoint_interval": 2, "work_dir": tmp_path / "run", "out_dir": tmp_path / "run/export",
        "validation_fraction": 0.2, "test_fraction": 0.2, "threads": 1, **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def make_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(SAMPLE_CODE.replace("add", f"add{i}"))
    return corpus


def test_train_checkpoint_resume_and_export(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    assert torch.load(tmp_path / "run/checkpoint.pt")["step"] == 2
    assert main(["--resume", *tiny_recipe(tmp_path, corpus)]) == 0
    state = torch.load(tmp_path / "run/checkpoint.pt")
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 32
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"val_loss", "val_top1"} <= set(log[-1])
    export = tmp_path / "run/export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.n_layer == 2 and len(tok) == model.config.vocab_size
    assert json.loads((export / "training_state.json").read_text())["tokens_seen"] == 256


def test_bad_config_is_one_line(tmp_path, capsys):
    assert main(["n_embd=30", "n_head=4", f"work_dir={tmp_path}"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_batches_are_a_pure_function_of_step_and_schedule_warms_then_decays():
    cfg = LMTrainConfig(seq_len=4, batch_size=3, seed=1, warmup_steps=10, max_steps=100, lr=1e-3, min_lr=1e-4)
    tokens = torch.arange(1000).numpy().astype("uint16")
    assert torch.equal(batch_at(tokens, cfg, 5, 0), batch_at(tokens, cfg, 5, 0))
    assert not torch.equal(batch_at(tokens, cfg, 5, 0), batch_at(tokens, cfg, 6, 0))
    b = batch_at(tokens, cfg, 0, 0)
    assert b.shape == (3, 5) and torch.equal(b[:, 1:] - b[:, :-1], torch.ones(3, 4, dtype=b.dtype))
    assert lr_at(cfg, 0) < lr_at(cfg, 9) == 1e-3
    assert abs(lr_at(cfg, 100) - 1e-4) < 1e-12 and lr_at(cfg, 50) < 1e-3
