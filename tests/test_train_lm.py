"""The training recipe end to end on a tiny corpus: tokenizer, steps, checkpoint, resume, export."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from earlyexit.errors import EarlyExitError
from earlyexit.training.lm_checkpoints import grown_layer_sources
from earlyexit.training.train_lm import LMTrainConfig, batch_at, lr_at, main

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
        # renamed enough that no file is a near-duplicate of another (the test split would drop it)
        (corpus / f"m{i}.py").write_text(SAMPLE_CODE.replace("add", f"add{i}").replace("items", f"items{i}").replace("push", f"push{i}"))
    return corpus


def test_train_checkpoint_resume_and_export(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["step"] == 2
    assert main(["--resume", *tiny_recipe(tmp_path, corpus)]) == 0
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 32
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"val_loss", "val_top1"} <= set(log[-1])
    export = tmp_path / "run/export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.n_layer == 2 and len(tok) == model.config.vocab_size
    assert json.loads((export / "training_state.json").read_text())["tokens_seen"] == 256
    # the exported context is the training window: positions past it were never trained
    assert model.config.n_positions == 32 and model.transformer.wpe.weight.shape[0] == 32
    (export / "model.safetensors").unlink()
    assert main(["--resume", *tiny_recipe(tmp_path, corpus)]) == 0  # a finished run is re-exported, not trained further
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["step"] == 4
    assert AutoModelForCausalLM.from_pretrained(export).config.n_positions == 32


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


def test_schedules_warm_up_decay_and_rewarm():
    from earlyexit.config import load_config
    from earlyexit.training.train_lm import LMTrainConfig, lr_at

    cos = LMTrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(cos, 0) == pytest.approx(1e-4) and lr_at(cos, 9) == pytest.approx(1e-3) and lr_at(cos, 99) < 1.01e-4
    wsd = LMTrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=200, schedule="wsd", decay_steps=50, rewarm_at=100)
    assert lr_at(wsd, 100) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 10)  # re-warms from min_lr, not from 0
    assert lr_at(wsd, 110) == lr_at(wsd, 150) == pytest.approx(1e-3)  # stable
    assert lr_at(wsd, 175) == pytest.approx((1e-3 + 1e-5) / 2) and lr_at(wsd, 200) == pytest.approx(1e-5)
    with pytest.raises(EarlyExitError, match="decay_steps"):
        LMTrainConfig(schedule="wsd", decay_steps=0)
    with pytest.raises(EarlyExitError, match="schedule"):
        LMTrainConfig(schedule="linear")
    shipped = load_config(LMTrainConfig, "configs/default_lm/phase2.yaml")
    assert shipped.rewarm_at == load_config(LMTrainConfig, "configs/default_lm/base.yaml").max_steps  # phase 2 continues phase 1


def test_wsd_keeps_the_stable_checkpoint_and_resumes_from_it(tmp_path):
    corpus = make_corpus(tmp_path)
    recipe = tiny_recipe(tmp_path, corpus, schedule="wsd", decay_steps=2, warmup_steps=1)
    assert main(recipe) == 0
    stable = tmp_path / "run/checkpoint_stable.pt"
    assert torch.load(stable, weights_only=True)["step"] == 2 and torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["step"] == 4
    assert main(["--resume-from", str(stable), *recipe, "max_steps=6"]) == 0  # a longer run from the stable point
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["step"] == 6
    assert main(["--resume-from", str(tmp_path / "nope.pt"), *recipe]) == 2


def test_missing_token_caches_are_rebuilt_with_the_same_tokenizer(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=1)) == 0
    before = np.load(tmp_path / "run/tokens_train.npy")
    for f in (tmp_path / "run").glob("tokens_*.npy"):
        f.unlink()
    assert main(["--resume", *tiny_recipe(tmp_path, corpus, max_steps=2)]) == 0
    assert np.array_equal(np.load(tmp_path / "run/tokens_train.npy"), before)


def test_init_from_an_export_continues_its_step_and_tokens(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    first = tmp_path / "run/export"
    # a new run in another work_dir with the same tokenizer and shape starts from the export, not from random weights
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(tmp_path / "run/tokenizer", second / "tokenizer")
    for name in ("corpus.json", *(f"{kind}_{split}.{ext}" for split in ("train", "validation", "test")
                                  for kind, ext in (("tokens", "npy"), ("files", "txt")))):
        shutil.copy(tmp_path / "run" / name, second / name)
    recipe = tiny_recipe(tmp_path, corpus, max_steps=3, init_from=first, work_dir=second, out_dir=second / "export",
                         n_positions=48, rewarm_at=2)
    assert main(recipe) == 0
    state = torch.load(second / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 2 * 32
    start = AutoModelForCausalLM.from_pretrained(first).state_dict()
    # the export's 32 positions were copied into the 48-row table; the weights moved on from the export's
    grown = state["model"]["transformer.wpe.weight"]
    assert grown.shape[0] == 48 and not torch.equal(grown[:32], start["transformer.wpe.weight"].float())


def test_init_from_in_a_fresh_work_dir_inherits_the_exports_tokenizer(tmp_path):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    (corpus / "extra.py").write_text(SAMPLE_CODE.replace("add", "extend_all"))  # a larger corpus for the new run
    second = tmp_path / "second"
    recipe = tiny_recipe(tmp_path, corpus, max_steps=3, init_from=tmp_path / "run/export", work_dir=second,
                         out_dir=second / "export", rewarm_at=2)
    assert main(recipe) == 0
    assert (second / "tokenizer/tokenizer.json").read_text() == (tmp_path / "run/tokenizer/tokenizer.json").read_text()
    assert torch.load(second / "checkpoint.pt", weights_only=True)["step"] == 3
    assert "extra.py" in "".join((second / f"files_{s}.txt").read_text() for s in ("train", "validation", "test"))
    # the export's curve keeps the first run's points, tagged with the work_dir (validation split) each was measured on
    curve = json.loads((second / "export/training_state.json").read_text())["curve"]
    places = [row["work_dir"] for row in curve]
    assert places[0] == str(tmp_path / "run") and places[-1] == str(second) and places == sorted(places, key=lambda w: w == str(second))
    # a recipe whose vocabulary differs from the export's tokenizer is named, not trained
    assert main(tiny_recipe(tmp_path, corpus, vocab_size=400, init_from=tmp_path / "run/export", work_dir=tmp_path / "third")) == 2


@pytest.mark.parametrize("log_kept", [False, True])
def test_a_phase_continues_from_its_own_export_when_the_checkpoint_is_gone(tmp_path, log_kept):
    """Another machine holds the shipped export but not the work_dir's checkpoint (nor, maybe, its log and caches):
    the next phase starts from the export in place (fresh optimizer), continues its step, and exporting over it
    never duplicates a point of the curve that both the export and the log hold."""
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=4)) == 0
    work = tmp_path / "run"
    before = json.loads((work / "export/training_state.json").read_text())["curve"]
    gone = ["checkpoint.pt"] if log_kept else ["checkpoint.pt", "log.jsonl", "corpus.json", "tokenizer",
                                               *(f"tokens_{s}.npy" for s in ("train", "validation", "test"))]
    for leftover in gone:
        shutil.rmtree(work / leftover) if (work / leftover).is_dir() else (work / leftover).unlink()
    recipe = tiny_recipe(tmp_path, corpus, max_steps=8, rewarm_at=4, init_from=work / "export")
    assert main(["--resume", *recipe]) == 0
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 8
    curve = json.loads((work / "export/training_state.json").read_text())["curve"]
    assert [r["step"] for r in curve] == [2, 4, 6, 8] and curve[:2] == before
    # a later re-export (here: the finished run resumed) reads the export it wrote as init_from: still no duplicates
    assert main(["--resume", *recipe]) == 0
    assert [r["step"] for r in json.loads((work / "export/training_state.json").read_text())["curve"]] == [2, 4, 6, 8]


def test_init_from_rejects_another_shape(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2, n_embd=48, init_from=tmp_path / "run/export",
                            work_dir=tmp_path / "run")) == 2
    assert "init_from" in capsys.readouterr().err


def test_grown_layer_sources_keep_every_layer_once_in_order():
    assert grown_layer_sources(12, 16) == [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11]
    assert grown_layer_sources(2, 2) == [0, 1]
    for old, new in ((2, 3), (3, 8), (12, 13)):
        sources = grown_layer_sources(old, new)
        assert sources[0] == 0 and sources[-1] == old - 1 and len(sources) == new
        assert all(b - a in (0, 1) for a, b in zip(sources, sources[1:]))  # in order, none skipped, repeats are new layers


def test_a_deeper_recipe_grows_from_an_export_and_starts_as_it(tmp_path, capsys):
    """grow_layers: a 3-layer model from a 2-layer export computes what the export did before its first step."""
    from earlyexit.runtime.loading import load_hf_model, load_tokenizer
    from earlyexit.training.train_lm import build_model, init_from_export

    corpus = make_corpus(tmp_path)
    assert main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    export = tmp_path / "run/export"
    small, tok = load_hf_model(export).float(), load_tokenizer(export)
    cfg = LMTrainConfig(vocab_size=300, n_layer=3, n_embd=32, n_head=2, n_positions=64, seq_len=32)
    deep = build_model(cfg, tok)
    assert init_from_export(deep, tok, export, grow_layers=True) == (2, 2 * 2 * 32)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert torch.allclose(deep(x).logits, small(x).logits, atol=1e-5)
    new = deep.transformer.h[1]  # sources 0 0 1: the second layer is the new one
    assert not new.attn.c_proj.weight.any() and not new.mlp.c_proj.bias.any() and new.attn.c_attn.weight.any()
    # training it from there: the recipe's own run with grow_layers
    second = tmp_path / "second"
    assert main(tiny_recipe(tmp_path, corpus, max_steps=4, n_layer=3, rewarm_at=2, grow_layers="true", init_from=export,
                            work_dir=second, out_dir=second / "export")) == 0
    assert AutoModelForCausalLM.from_pretrained(second / "export").config.n_layer == 3
    # without the flag, or to fewer layers, the mismatch is named
    for n_layer, flag in ((3, "false"), (1, "true")):
        assert main(tiny_recipe(tmp_path, corpus, max_steps=4, n_layer=n_layer, grow_layers=flag, init_from=export,
                                work_dir=tmp_path / f"other{n_layer}")) == 2
        assert "layers" in capsys.readouterr().err


def test_budgeted_lowers_max_steps_to_what_the_time_left_affords():
    from earlyexit.training.train_lm import budgeted

    cfg = LMTrainConfig(schedule="wsd", max_steps=1000, warmup_steps=10, decay_steps=100)
    fitted = budgeted(cfg, step=50, seconds_per_step=0.5, seconds_left=100.0)
    assert (fitted.max_steps, fitted.decay_steps) == (250, 100)
    assert budgeted(cfg, 50, 0.5, 1e6).max_steps == 1000  # never past the recipe's own
    short = budgeted(cfg, 50, 0.5, 20.0)  # fewer steps left than the decay: it starts now
    assert (short.max_steps, short.decay_steps) == (90, 40) and lr_at(short, 51) < cfg.lr
    assert budgeted(cfg, 50, 0.5, 0.0).max_steps == 51


@pytest.mark.parametrize("eval_interval", [20, 100_000])  # fitted at evaluations; or, on a slow machine, before any
def test_a_budgeted_run_decays_and_stops_inside_its_minutes(tmp_path, eval_interval):
    corpus = make_corpus(tmp_path)
    budget = 0.1  # 6 s: compilation off, each tiny step takes milliseconds
    assert main(tiny_recipe(tmp_path, corpus, max_steps=100_000, schedule="wsd", decay_steps=50, budget_minutes=budget,
                            eval_interval=eval_interval, checkpoint_interval=1000)) == 0
    state = json.loads((tmp_path / "run/export/training_state.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    fitted = LMTrainConfig(**{k: v for k, v in state["config"].items()})
    assert 40 < fitted.max_steps < 100_000 and state["step"] == fitted.max_steps == log[-1]["step"]
    assert log[-1]["time"] - log[0]["time"] < budget * 60 * 2
    assert lr_at(fitted, fitted.max_steps - 1) < 2 * fitted.min_lr  # it decayed to the end


def test_budget_minutes_needs_the_wsd_schedule():
    with pytest.raises(EarlyExitError, match="budget_minutes"):
        LMTrainConfig(schedule="cosine", budget_minutes=5)


def test_every_recipe_config_in_the_repository_loads():
    """A phase's YAML with a misspelt or retired key would only fail when someone retrains from it."""
    from pathlib import Path

    from earlyexit.config import load_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs" / "default_lm").glob("*.yaml"))
    assert len(recipes) >= 12
    for path in recipes:
        cfg = load_config(LMTrainConfig, path)
        assert cfg.max_steps > cfg.rewarm_at, path.name


def test_two_processes_under_torchrun_train_what_one_process_of_twice_the_batch_does(tmp_path):
    import os
    import subprocess
    import sys

    corpus = make_corpus(tmp_path)
    # each run prepares its own work_dir; under torchrun rank 0 does, and rank 1 then reads its caches
    one = tiny_recipe(tmp_path / "one", corpus, batch_size=4, bf16=False)
    assert main(one) == 0
    two = tiny_recipe(tmp_path / "two", corpus, batch_size=2, bf16=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "earlyexit.training.train_lm", *two],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "run/checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 4 and a["tokens_seen"] == b["tokens_seen"]
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    log = [json.loads(line) for line in (tmp_path / "two/run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 alone writes the log
