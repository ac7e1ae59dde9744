"""The model card is computed by its script from a real (tiny) training run, not written by hand."""

import json
import math

import pytest
import yaml

from earlyexit.evaluation import model_card
from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT as DEFAULT_CACHE_WEIGHT
from earlyexit.training.train_lm import main as train_main

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
    # each sample twice: the model alone and as the CLI writes it (n-gram cache, repetition stop)
    assert all(s["cli_finish"] for s in result["samples"])
    # the same lines with the n-gram cache, and the same cuts with the whole file above them
    for key in ("line_completion_cached", "line_completion_whole_file", "line_completion_whole_file_no_cache"):
        assert result[key]["examples"] == 3
    assert result["config"]["cache_weight"] == DEFAULT_CACHE_WEIGHT
    card = (export / "MODEL_CARD.md").read_text()
    assert f"{result['validation']['loss']:.3f}" in card and (export / "training_curve.png").exists()
    loops = sum(s["cli_finish"] == "repetition" for s in result["samples"])
    assert f"{loops} of 2 samples loop within" in card
    # the default shows 8 line completions as scored; this run has 3 lines
    shown, breakdown = result["line_completion"]["shown_examples"], result["line_completion"]["breakdown"]
    assert len(shown) == 3 and math.isclose(sum(breakdown[k] for k in ("exact", "stopped_short", "ran_on", "diverged")), 1.0)
    assert "### Where line completions go wrong" in card and card.count("| `") + card.count("| *(nothing)*") >= 3
    # the horizon's measure beside the issue's, named as not the issue's
    assert f"these healed lines score {result['line_completion']['indel_similarity']:.3f}" in card
    editor = result["line_completion_whole_file"]
    assert (f"| the same, with the n-gram cache: the CLI's defaults on a file in an editor | 3 | {editor['exact_match']:.1%} | "
            f"{editor['edit_similarity']:.3f} |") in card
    assert f"whole file above the cut: exact match | ≥ 25% | {editor['exact_match']:.1%} |" in card


def test_model_card_refuses_a_model_without_training_state(tmp_path, tiny_model_dir, capsys):
    assert model_card.main(["--model", str(tiny_model_dir)]) == 2
    assert "training_state.json" in capsys.readouterr().err


def test_recipe_names_every_phase_in_order(tmp_path):
    from earlyexit.evaluation.recipe import recipe_phases, schedule_lines

    tmp_path = tmp_path / "default_lm"  # named as a recipe is named: configs/<folder>/<file>
    tmp_path.mkdir()

    base = {"work_dir": "runs/x", "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 10}
    for name, extra in {"a.yaml": {"max_steps": 100}, "b.yaml": {"max_steps": 300, "rewarm_at": 100, "schedule": "wsd", "decay_steps": 50},
                        "c.yaml": {"max_steps": 500, "rewarm_at": 300, "schedule": "wsd", "decay_steps": 50},
                        "other.yaml": {"max_steps": 300, "work_dir": "runs/y"}}.items():
        (tmp_path / name).write_text(yaml.safe_dump({**base, **extra}))
    shipped = {**base, "max_steps": 500, "rewarm_at": 300}
    assert [p for p, _ in recipe_phases(shipped, tmp_path)] == ["configs/default_lm/a.yaml", "configs/default_lm/b.yaml", "configs/default_lm/c.yaml"]
    lines = schedule_lines(shipped, tmp_path)
    assert (lines[2].startswith("- Phase 3 (`configs/default_lm/c.yaml`, `--resume`): 16 × 256-token windows; re-warm at step 300")
            and "c.yaml --resume`." in lines[-1])
    assert recipe_phases({**shipped, "max_steps": 700}, tmp_path) == []  # no config ends there: no made-up recipe
    # a phase that starts from an earlier phase's export in a new work_dir continues the chain through that export
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({**base, "work_dir": "runs/z", "max_steps": 600, "rewarm_at": 500,
                                                     "init_from": "runs/x/export", "sources": ["stdlib", "numpy"]}))
    widened = {**base, "work_dir": "runs/z", "max_steps": 600, "rewarm_at": 500, "init_from": "runs/x/export"}
    assert recipe_phases(widened, tmp_path) == []  # no config exports to runs/x/export yet
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**yaml.safe_load((tmp_path / f"{name}.yaml").read_text()),
                                                               "out_dir": "runs/x/export"}))
    assert [p for p, _ in recipe_phases(widened, tmp_path)] == [f"configs/default_lm/{n}.yaml" for n in "abcd"]
    assert ("starts from `runs/x/export`" in schedule_lines(widened, tmp_path)[3]
            and "on its own corpus in `runs/z`" in schedule_lines(widened, tmp_path)[3])
    # a phase that starts from the previous phase's export in that phase's own work_dir (its checkpoint gone) says so
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({**base, "work_dir": "runs/z", "out_dir": "runs/z/export", "max_steps": 600,
                                                     "rewarm_at": 500, "init_from": "runs/x/export"}))
    (tmp_path / "d.yaml").unlink()
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({**base, "work_dir": "runs/z", "max_steps": 800, "rewarm_at": 600,
                                                     "init_from": "runs/z/export"}))
    in_place = {**base, "work_dir": "runs/z", "max_steps": 800, "rewarm_at": 600, "init_from": "runs/z/export"}
    assert [p for p, _ in recipe_phases(in_place, tmp_path)][-2:] == ["configs/default_lm/e.yaml", "configs/default_lm/f.yaml"]
    assert "the previous phase's export in the same work_dir" in schedule_lines(in_place, tmp_path)[4]
    # a deeper phase grown from the previous export, on the same corpus in a new work_dir; numbered by its file's name
    (tmp_path / "phase9.yaml").write_text(yaml.safe_dump({**base, "work_dir": "runs/deep", "max_steps": 900, "rewarm_at": 800,
                                                          "init_from": "runs/z/export", "grow_layers": True, "n_layer": 16}))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({**yaml.safe_load((tmp_path / "f.yaml").read_text()), "out_dir": "runs/z/export"}))
    grown = schedule_lines({**base, "work_dir": "runs/deep", "max_steps": 900, "rewarm_at": 800}, tmp_path)
    assert grown[5].startswith("- Phase 9 (`configs/default_lm/phase9.yaml`, `--resume`): starts from `runs/z/export`")
    assert "in its own work_dir `runs/deep`; grown from 12 to 16 layers" in grown[5]


def test_recipe_evidence_reads_the_sweeps_and_flags_a_curve_behind_the_model(tmp_path):
    def write(name, body, config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"stamp": {"commit": "abc1234", "config": config,
                                                                            "machine": "Test CPU (AMX), 2 threads"}, **body}))

    write("recipe_sweep", {"best_lr": 1e-3, "best_shape": "3x192", "rows": [
        {"sweep": "learning rate", "shape": "6x128", "lr": 1e-3, "val_loss": 5.3},
        {"sweep": "learning rate", "shape": "6x128", "lr": 3e-3, "val_loss": 5.6},
        {"sweep": "shape", "shape": "3x192", "lr": 1e-3, "val_loss": 5.1}]},
        {"steps": 300, "batch_size": 8, "seq_len": 256, "base_shape": "6x128"})
    write("quality_curve", {"rows": [{"step": 50, "tokens_seen": 2e5, "context": 256, "examples": 9, "exact_match": 0.05,
                                      "edit_similarity": 0.2, "scored_at": "0ld1234"},
                                     {"step": 100, "tokens_seen": 4e5, "context": 256, "examples": 9, "exact_match": 0.1,
                                      "edit_similarity": 0.3, "scored_at": None}],
                            "paired": [{"from_step": 50, "to_step": 100, "gained": 4, "lost": 1, "p_value": 0.375}]}, {})
    write("schedule_sweep", {"best_warmup": 30, "best_effective_batch": 8, "rows": [
        {"sweep": "warm-up", "warmup_steps": 10, "effective_batch": 8, "val_loss": 5.4},
        {"sweep": "warm-up", "warmup_steps": 30, "effective_batch": 8, "val_loss": 5.3},
        {"sweep": "effective batch", "warmup_steps": 30, "effective_batch": 8, "val_loss": 5.3},
        {"sweep": "effective batch", "warmup_steps": 15, "effective_batch": 16, "val_loss": 5.5}]}, {"shape": "6x128", "lr": 1.2e-3})
    evidence = model_card.recipe_evidence(tmp_path)
    assert set(evidence) == {"recipe_sweep", "schedule_sweep", "quality_curve"} and evidence["recipe_sweep"]["commit"] == "abc1234"
    sweeps = "\n".join(model_card.sweep_lines(evidence["recipe_sweep"], None, evidence["schedule_sweep"]))
    assert "0.001 → 5.30, 0.003 → 5.60; best 0.001" in sweeps and "6x128 → 5.30, 3x192 → 5.10; best 3x192" in sweeps
    assert "10 steps → 5.40, 30 steps → 5.30; best 30" in sweeps and "8 windows → 5.30, 16 windows → 5.50; best 8" in sweeps
    assert "no point at this model's step (200): rerun" in "\n".join(model_card.curve_lines(evidence["quality_curve"], step=200))
    table = "\n".join(model_card.curve_lines(evidence["quality_curve"], step=100))
    write("train_throughput", {"rows": [{"variant": "fp32", "tokens_per_s": 1234.4}]}, {})
    speeds = "\n".join(model_card.throughput_lines(model_card.recipe_evidence(tmp_path)["train_throughput"]))
    assert "| fp32 | 1,234 |" in speeds and "on Test CPU (AMX), 2 threads at commit `abc1234`" in speeds
    older = "\n".join(model_card.throughput_lines([{"variant": "bf16", "tok_s": 2000}]))  # a card's rows alone, no stamp
    assert "| bf16 | 2,000 |" in older and " on " not in older and model_card.throughput_lines(None) == []
    assert "rerun" not in table and "| 5.0% | 0.200 | `0ld1234` |" in table and "| 10.0% | 0.300 | `abc1234` |" in table
    assert "from step 50 to 100, line by line: 4 lines gained, 1 lost (sign test p = 0.38" in table


def test_paired_exact_match_counts_flips_and_tests_them():
    from earlyexit.evaluation.backbone_quality import paired_exact_match, paired_lines

    assert paired_exact_match("0011", "0101") == {"gained": 1, "lost": 1, "p_value": 1.0}
    clear = paired_exact_match("0" * 12, "1" * 10 + "00")
    assert clear["gained"] == 10 and clear["lost"] == 0 and clear["p_value"] == pytest.approx(2 / 2 ** 10)
    assert paired_exact_match("1", "1")["p_value"] == 1.0  # no discordant line: nothing to test
    with pytest.raises(ValueError):
        paired_exact_match("01", "011")
    assert "beyond noise" in paired_lines([{"from_step": 1, "to_step": 2, **clear}])[0]
    assert "not distinguishable" in paired_lines([{"from_step": 1, "to_step": 2, "gained": 3, "lost": 2, "p_value": 1.0}])[0]


def test_quality_projection_recovers_a_log_linear_curve_and_the_card_prints_it():
    from earlyexit.evaluation.backbone_quality import quality_projection

    # exact match gains 4 points per doubling from 10% at 10M tokens: 25% needs 2^(15/4) x 10M = 134.5M
    rows = [{"step": i, "tokens_seen": t * 1e6, "context": 512, "examples": 9, "exact_match": 0.10 + 0.04 * math.log2(t / 10),
             "edit_similarity": 0.5 - 0.01 * math.log2(t / 10), "rouge_l": 0.7} for i, t in enumerate([10, 20, 40, 80])]
    fits = quality_projection(rows, {"exact_match": 0.25, "edit_similarity": 0.6, "rouge_l": 0.6})
    assert fits["exact_match"]["per_doubling"] == pytest.approx(0.04)
    assert fits["exact_match"]["tokens_at_target"] == pytest.approx(10e6 * 2 ** (0.15 / 0.04), rel=1e-6)
    assert fits["edit_similarity"]["tokens_at_target"] is None  # falling: never gets there
    assert fits["rouge_l"]["times_last"] == pytest.approx(1.0)  # past the target already
    card = "\n".join(model_card.curve_lines({"rows": rows, "commit": "abc1234", "projection": fits}, step=3))
    assert "+4.0 points per doubling" in card and "about 135M tokens seen (1.7x the last point's)" in card
    assert "never reaches 0.60" in card and "the fit is at or past 0.60 already" in card
    assert quality_projection(rows[:2], {"exact_match": 0.25}) == {}  # two points fit any line
    runtime = {"exact_match": rows[-1]["exact_match"] + 0.05, "edit_similarity": rows[-1]["edit_similarity"] + 0.02}
    beside = "\n".join(model_card.curve_lines({"rows": rows, "commit": "abc1234", "projection": fits}, step=3, runtime=runtime))
    assert "+5.0 points / +0.020 from its point on the curve" in beside and "did not ship" not in beside  # the runtime's healing beside the curve's
    # a phase that trained past the shipped model but did not ship: the runtime is set beside the shipped model's own point
    behind = "\n".join(model_card.curve_lines({"rows": rows, "commit": "abc1234"}, step=2, runtime=runtime))
    assert "Points past step 2 are phases that trained but did not ship" in behind and "rerun" not in behind
    assert f"{(runtime['exact_match'] - rows[2]['exact_match']) * 100:+.1f} points" in behind
    assert "runtime's healing" not in "\n".join(model_card.curve_lines({"rows": rows, "commit": "abc1234"}, step=4, runtime=runtime))


def test_completion_breakdown_says_where_each_completion_parts_from_its_target():
    from earlyexit.evaluation.backbone_quality import completion_breakdown

    b = completion_breakdown(["x = 1  ", "x =", "x = 12)", "y = 1", ""], ["x = 1", "x = 1", "x = 1", "x = 1", "x = 1"])
    assert (b["exact"], b["stopped_short"], b["ran_on"], b["diverged"]) == (0.2, 0.4, 0.2, 0.2)  # "" stops short too
    assert math.isclose(b["target_share_right_before_first_error"], (1 + 0.6 + 1 + 0 + 0) / 5)


def test_line_errors_render_code_with_pipes_and_backticks_in_table_cells():
    lc = {"examples": 2, "breakdown": {"exact": 0.5, "stopped_short": 0.0, "ran_on": 0.0, "diverged": 0.5,
                                       "target_share_right_before_first_error": 0.75},
          "shown_examples": [{"prompt_line": "    x = a |", "target": " b", "prediction": " b", "exact": True, "edit_similarity": 1.0},
                             {"prompt_line": "s = `", "target": "x`", "prediction": "", "exact": False, "edit_similarity": 0.0}]}
    text = "\n".join(model_card.line_error_lines(lc))
    assert "50% exact" in text and "50% go wrong inside it" in text and "75% of the target's characters" in text
    assert "| `x = a \\|` | `b` | `b` | 1.00 (exact) |" not in text  # leading spaces are kept in targets
    assert "| `x = a \\|` | ` b` | ` b` | 1.00 (exact) |" in text and "| `` s = ` `` | `` x` `` | *(nothing)* | 0.00 |" in text
    assert model_card.line_error_lines({"examples": 3}) == []  # a card written before the breakdown


def test_curve_lines_pair_this_model_with_its_parent_and_name_every_phase_past_it():
    """Phases 11 and 12 both continue phase 10; phase 12 ships: phase 11, listed before it but past its step, did not."""
    rows = [{"step": s, "tokens_seen": t, "context": 512, "layers": n, "examples": 9, "exact_match": 0.2, "edit_similarity": 0.5}
            for s, t, n in ((10, 1e6, 12), (30, 3e6, 12), (25, 2.5e6, 16))]
    paired = [{"from_step": 10, "to_step": 30, "gained": 1, "lost": 0, "p_value": 1.0},
              {"from_step": 10, "to_step": 25, "gained": 3, "lost": 1, "p_value": 0.625}]
    card = "\n".join(model_card.curve_lines({"rows": rows, "commit": "abc1234", "paired": paired}, step=25))
    assert "Points past step 25 are phases that trained but did not ship" in card
    assert "from step 10 to 25, line by line: 3 lines gained" in card and "to 30" not in card
    assert "| 25 | 2.5M | 16 | 512 |" in card


def test_quality_curve_pairs_each_phase_with_the_one_it_continued_from(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import quality_curve

    def recipe(name, rewarm_at):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"rewarm_at: {rewarm_at}\nmax_steps: 100\n")
        return str(path)

    rows = [{"recipe": recipe(n, w), "step": s, "exact": e}
            for n, w, s, e in (("p1", 0, 10, "0011"), ("p2", 10, 20, "0111"), ("p3", 20, 30, "1111"), ("p4", 20, 25, "0110"))]
    assert [(p["from_step"], p["to_step"]) for p in quality_curve.paired_steps(rows)] == [(10, 20), (20, 30), (20, 25)]


def test_render_only_rewrites_the_card_with_the_current_curve_and_keeps_the_models_figures(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    assert train_main(tiny_recipe(tmp_path, corpus, max_steps=2)) == 0
    export = tmp_path / "run/export"
    small = ["loss_windows=4", "seq_len=16", "line_examples=3", "token_examples=3", "target_tokens=4", "max_line_tokens=5",
             "sample_max_new_tokens=4", "sample_prompts=['def f(']"]
    assert model_card.main(["--model", str(export), *small]) == 0
    before = json.loads((export / "eval.json").read_text())
    results = tmp_path / "results"
    (results / "quality_curve").mkdir(parents=True)
    rows = [{"step": 2, "tokens_seen": 128, "context": 32, "layers": 2, "examples": 3, "exact_match": 0.25, "edit_similarity": 0.5},
            {"step": 9, "tokens_seen": 999, "context": 32, "layers": 3, "examples": 3, "exact_match": 0.5, "edit_similarity": 0.75}]
    (results / "quality_curve/results.json").write_text(json.dumps({"stamp": {"commit": "c0ffee1", "config": {}}, "rows": rows}))
    model_card.rerender_card(export, results)
    after = json.loads((export / "eval.json").read_text())
    card = (export / "MODEL_CARD.md").read_text()
    assert "| 9 | 0.0M | 3 | 32 | 50.0% | 0.750 |" in card and "Points past step 2 are phases that trained but did not ship" in card
    assert after["validation"] == before["validation"] and after["line_completion"] == before["line_completion"]
    assert after["commit"] == before["commit"]  # the model's figures keep the commit they were measured at
    assert model_card.main(["--model", str(tmp_path), "--render-only"]) == 2
    assert "no eval.json" in capsys.readouterr().err
