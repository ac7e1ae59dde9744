"""Calibration of the exit threshold: the binomial tail, the fixed-sequence test, and a run that writes the heads' config."""

import json
import math

import pytest

from earlyexit.training.calibrate import binomial_tail, choose_threshold
from earlyexit.training.calibrate import main as calibrate_main
from earlyexit.errors import EarlyExitError


@pytest.mark.parametrize("n,p", [(1, 0.3), (7, 0.01), (20, 0.5), (33, 0.1)])
def test_binomial_tail_matches_the_sum_of_the_pmf(n, p):
    for k in range(n + 1):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def row(threshold, tokens, disagreements):
    return {"threshold": threshold, "tokens": tokens, "disagreements": disagreements}


def test_fixed_sequence_stops_at_the_first_threshold_it_cannot_certify():
    table = [row(0.5, 1000, 0), row(0.9, 1000, 2), row(0.8, 1000, 30), row(0.99, 1000, 0)]
    chosen, tests = choose_threshold(table, target=0.99, delta=0.05)
    # 0.99 and 0.9 certified; 0.8 (3% disagreement) fails, so 0.5 is never tested although it looks perfect
    assert chosen == 0.9 and [t["threshold"] for t in tests] == [0.99, 0.9, 0.8] and not tests[-1]["certified"]
    assert choose_threshold(table, target=0.95, delta=0.05)[0] == 0.5  # a looser target certifies 0.8 (97%) too
    assert choose_threshold([row(0.9, 10, 0)], target=0.99, delta=0.05)[0] == 1.0  # too few tokens: exits stay off
    with pytest.raises(EarlyExitError, match="must be in"):
        choose_threshold(table, target=1.0, delta=0.05)


@pytest.fixture
def calibrated_dir(tmp_path, tiny_model_dir):
    import torch

    from earlyexit.runtime.heads import CONTINUE, ExitHeads
    from earlyexit.runtime.loading import load_runtime_model

    from test_train_lm import make_corpus

    corpus = make_corpus(tmp_path)
    (tiny_model_dir / "training_state.json").write_text(json.dumps(
        {"config": {"sources": [str(corpus)], "validation_fraction": 0.3, "test_fraction": 0.2}}))
    model, _ = load_runtime_model(tiny_model_dir)
    heads = ExitHeads.for_backbone(model, rank=2)
    with torch.no_grad():
        heads.cls.weight.zero_()
        heads.layer_bias[:, CONTINUE] = 50.0  # never exits: every token agrees with the full model
    heads.save(tiny_model_dir)
    return tiny_model_dir


def test_calibrate_certifies_and_writes_the_heads_config(calibrated_dir, capsys):
    from earlyexit.cli import main as generate_main

    assert calibrate_main(["--model", str(calibrated_dir), "--target-agreement", "0.9", "prompts=4", "max_new_tokens=10",
                           "grid=[0.9, 0.5]", "threads=1"]) == 0
    assert "chosen exit threshold: 0.5" in capsys.readouterr().out
    config = json.loads((calibrated_dir / "exit_heads.json").read_text())
    cal = config["calibration"]
    assert config["thresholds"]["exit"] == 0.5 and cal["target_agreement"] == 0.9
    assert all(r["tokens"] >= 29 and r["disagreements"] == 0 and r["mean_layers"] == 3 for r in cal["table"])
    # the CLI re-runs the test from the stored table: 0.999 cannot be certified with this few tokens
    assert generate_main(["x = 1", "--model", str(calibrated_dir), "--max-new-tokens", "2", "--json", "--target-agreement", "0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["thresholds"]["exit"] == 0.5
    assert generate_main(["x = 1", "--model", str(calibrated_dir), "--max-new-tokens", "2", "--json", "--target-agreement", "0.999"]) == 0
    assert json.loads(capsys.readouterr().out)["thresholds"]["exit"] == 1.0


def test_target_agreement_needs_a_calibration_table_and_a_valid_rate(tiny_model_dir, capsys):
    from earlyexit.cli import main as generate_main
    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.loading import load_runtime_model

    model, _ = load_runtime_model(tiny_model_dir)
    ExitHeads.for_backbone(model, rank=2).save(tiny_model_dir)
    for args, message in ((["--target-agreement", "0.9"], "no calibration table"), (["--target-agreement", "1.5"], "must be in (0, 1)"),
                          (["--target-agreement", "0.9", "--exit-threshold", "0.5"], "not both")):
        assert generate_main(["x = 1", "--model", str(tiny_model_dir), *args]) == 2
        assert message in capsys.readouterr().err
    assert calibrate_main(["--model", str(tiny_model_dir), "delta=2"]) == 2
    assert "delta must be in (0, 1)" in capsys.readouterr().err
