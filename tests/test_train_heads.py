"""train_heads end to end on a tiny model: single process, and two processes under torchrun (gloo)."""

import json
import os
import subprocess
import sys

from earlyexit.runtime.heads import load_heads
from earlyexit.runtime.loading import load_runtime_model
from earlyexit.training.train_heads import main

from test_train_lm import make_corpus


def recipe(tmp_path, corpus, out):
    return [f"sources=[{corpus}]", "rank=4", "seq_len=16", "batch_size=2", "head_steps=3", "classifier_steps=2", "warmup_steps=1",
            "loss_positions=8", "train_tokens=3000", "eval_windows=4", "threads=1", "bf16=false", "checkpoint_interval=2",
            f"work_dir={tmp_path / 'work'}", f"out_dir={out}"]


def test_train_heads_writes_loadable_heads_with_thresholds_and_validation_stats(tmp_path, tiny_model_dir):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "heads"
    assert main(["--model", str(tiny_model_dir), *recipe(tmp_path, corpus, out)]) == 0
    model, _ = load_runtime_model(tiny_model_dir)
    heads = load_heads(out, model)
    table = heads.cfg.training["validation"]
    assert len(table["per_layer_top1"]) == model.dims.n_layer and table["tokens"] > 0
    assert [r["threshold"] for r in table["exit"]] == heads.cfg.training["config"]["threshold_grid"]
    assert 0 <= heads.cfg.thresholds.exit <= 1 and 0 <= heads.cfg.thresholds.stop <= 1
    assert heads.cfg.training["parameter_share"] < 0.10
    phases = [json.loads(line)["phase"] for line in (tmp_path / "work/log.jsonl").read_text().splitlines()]
    assert phases == ["heads"] * 3 + ["controller"] * 2


def test_bad_heads_config_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "loss=mse", f"work_dir={tmp_path}"]) == 2
    assert "loss must be" in capsys.readouterr().err


def test_runs_unchanged_under_torchrun_with_two_processes(tmp_path, tiny_model_dir):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "heads"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "earlyexit.training.train_heads", "--model", str(tiny_model_dir), *recipe(tmp_path, corpus, out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _ = load_runtime_model(tiny_model_dir)
    assert load_heads(out, model).cfg.training["world_size"] == 2


def test_thresholds_need_confidence_not_just_a_lucky_rate():
    from earlyexit.training.train_heads import HeadsTrainConfig, choose_thresholds, wilson_lower

    assert wilson_lower(7, 7) < 0.8 < wilson_lower(900, 1000)
    table = {"tokens": 10_000,
             "exit": [{"threshold": 0.5, "agreement": 0.90}, {"threshold": 0.7, "agreement": 0.96}, {"threshold": 0.9, "agreement": 0.999}],
             "stop": [{"threshold": 0.5, "fired": 0.3, "precision": 0.6}, {"threshold": 0.9, "fired": 0.0007, "precision": 1.0},
                      {"threshold": 0.99, "fired": 0.0, "precision": None}]}
    cfg = HeadsTrainConfig(target_agreement=0.95, target_stop_precision=0.8)
    chosen = choose_thresholds(table, cfg)
    assert chosen.exit == 0.7 and chosen.stop == 1.0  # 7 perfect stops are not evidence of 80% precision
