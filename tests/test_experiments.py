"""Experiment scripts run end to end on a tiny model (--limit), write their schema, and compute their numbers."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from earlyexit.train_heads import main as train_heads  # noqa: E402

from test_train_lm import make_corpus  # noqa: E402


@pytest.fixture
def model_with_heads(tmp_path, tiny_model_dir, monkeypatch):
    corpus = make_corpus(tmp_path)
    (tiny_model_dir / "training_state.json").write_text(json.dumps(
        {"config": {"sources": [str(corpus)], "validation_fraction": 0.2, "test_fraction": 0.2}}))
    assert train_heads(["--model", str(tiny_model_dir), "rank=2", "seq_len=16", "batch_size=2", "head_steps=2", "classifier_steps=2",
                        "loss_positions=8", "train_tokens=2000", "eval_windows=2", "threads=1", "bf16=false",
                        f"work_dir={tmp_path / 'work'}"]) == 0
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    return tiny_model_dir


def test_per_layer_study_limit_run(model_with_heads, tmp_path):
    import per_layer_study

    assert per_layer_study.main(["--model", str(model_with_heads), "--limit", "3", "seq_len=16", "target_tokens=4"]) == 0
    out = tmp_path / "results/per_layer_study"
    result = json.loads((out / "results.json").read_text())
    L = result["n_layer"]
    assert len(result["right_first_at_layer"]) == L and result["tokens"] == 3 * 16
    assert abs(sum(result["right_first_at_layer"]) + result["wrong_at_all_layers"] - 1) < 1e-6
    assert abs(sum(result["agree_first_at_layer"]) - 1) < 1e-6  # the last layer always agrees with itself
    assert sum(g["completions"] for g in result["acceptance_proxy"].values()) == 3
    assert (out / "cumulative_by_layer.png").stat().st_size > 0 and "study" in (out / "results.md").read_text()


def test_benchmark_limit_run_has_every_mode(model_with_heads, tmp_path):
    import benchmark_generate

    assert benchmark_generate.main(["--model", str(model_with_heads), "--prompts", "2", "--repeats", "1", "--warmup", "0",
                                    "--max-new-tokens", "5", "--max-prompt-tokens", "20", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "results/benchmark_generate/results.json").read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == {"transformers generate", "earlyexit full", "earlyexit early-exit", "earlyexit lossless"}
    assert rows["earlyexit full"]["identical_to_full"] == 1.0 and rows["earlyexit lossless"]["identical_to_full"] == 1.0
    assert rows["transformers generate"]["identical_to_full"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values()) and result["stamp"]["commit"]
