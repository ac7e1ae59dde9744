"""Experiment scripts run end to end on a tiny model (--limit), write their schema, and compute their numbers."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from earlyexit.training.train_heads import main as train_heads  # noqa: E402

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
                                    "--max-new-tokens", "5", "--max-prompt-tokens", "20", "--threads", "1", "--no-memory"]) == 0
    result = json.loads((tmp_path / "results/benchmark_generate/results.json").read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    peers = {"llama.cpp fp32", "llama.cpp Q8_0", "onnxruntime", "ggml (ctransformers)"}
    ours = {"earlyexit full", "earlyexit early-exit", "earlyexit lossless", "earlyexit lossless (fp32 exit drafts)", "earlyexit lossless (stopping)",
            "earlyexit full (int8 weights)", "earlyexit early-exit (int8 weights)"}
    assert set(rows) - peers == {"transformers generate", *ours}
    assert set(rows) & peers | set(result["unavailable"]) == peers  # a peer that cannot run is reported, never dropped
    for name in ("earlyexit full", "earlyexit lossless", "earlyexit lossless (fp32 exit drafts)", "transformers generate", *(set(rows) & peers)):
        assert rows[name]["identical_to_full"] == 1.0 and rows[name]["rouge_l_vs_full"] == 1.0, name
    assert all(r["tokens_per_s"] > 0 for r in rows.values()) and result["stamp"]["commit"]
    assert (tmp_path / "results/benchmark_generate/ms_per_token.png").stat().st_size > 0
    assert (all(r["memory_added_mb"] is None for r in rows.values())
            and "memory added MB" in (tmp_path / "results/benchmark_generate/results.md").read_text())


def test_benchmark_line_task_on_a_prompts_file_stops_every_engine_at_the_end_of_the_line(model_with_heads, tmp_path):
    import benchmark_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return", "target": " a + b"}) + "\n\n"
                       + json.dumps({"prompt": "import os\nimport"}) + "\n")
    assert benchmark_generate.main(["--model", str(model_with_heads), "--prompts", str(prompts), "--task", "line", "--repeats", "1",
                                    "--warmup", "0", "--max-new-tokens", "6", "--threads", "1", "--no-memory", "--no-peers"]) == 0
    result = json.loads((tmp_path / "results/benchmark_generate_line/results.json").read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    assert result["task"] == "line" and "transformers generate" in rows and "earlyexit lossless" in rows
    for name, r in rows.items():
        assert r["line_exact_match"] is not None and 0 <= r["line_edit_similarity"] <= 1, name
    assert rows["earlyexit lossless"]["identical_to_full"] == 1.0 and rows["transformers generate"]["identical_to_full"] == 1.0
    assert rows["earlyexit full"]["speedup_vs_full"] == 1.0 and rows["earlyexit full"]["speedup_vs_llama_cpp"] is None
    assert set(result["unavailable"]) == {"llama.cpp fp32", "llama.cpp Q8_0", "onnxruntime", "ggml (ctransformers)"}
    import summarize

    full = rows["earlyexit full"]
    assert (f"earlyexit full {full['median_ms_per_token']:.2f} ms (1.00× full, - llama.cpp), 100% identical, "
            f"EM {full['line_exact_match']:.1%}") in summarize.section(tmp_path / "results")


@pytest.mark.parametrize("content, message", [("not json\n", "is not JSON"), ('{"target": "x"}\n', "prompt"), ("\n", "holds no prompts")])
def test_benchmark_refuses_a_bad_prompts_file_in_one_line(model_with_heads, tmp_path, capsys, content, message):
    import benchmark_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    assert benchmark_generate.main(["--model", str(model_with_heads), "--prompts", str(prompts), "--no-memory", "--no-peers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_benchmark_memory_probe_runs_one_engine(model_with_heads, capsys):
    import benchmark_generate

    capsys.readouterr()
    assert benchmark_generate.main(["--model", str(model_with_heads), "--memory-of", "earlyexit lossless", "--max-new-tokens", "3"]) == 0
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe["peak_rss_mb"] >= probe["added_mb"] > 0  # the engine's own weights at least
    capsys.readouterr()
    assert benchmark_generate.main(["--model", str(model_with_heads), "--memory-of", "baseline"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["added_mb"] < probe["added_mb"]


def steer_heads(model_dir: Path, action: int, logit: float, layer: int = 0) -> None:
    """Bias the saved controller towards `action` at `layer`, so thresholds around its probability behave differently."""
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import load_runtime_model

    model, _ = load_runtime_model(model_dir)
    heads = load_heads(model_dir, model)
    with torch.no_grad():
        heads.cls.weight.zero_()
        heads.cls.bias.zero_()
        heads.layer_bias.zero_()
        heads.prev_bias.zero_()
        heads.layer_bias[layer, action] = logit
    heads.save(model_dir)


def test_threshold_sweep_limit_run(model_with_heads, tmp_path):
    import threshold_sweep
    from earlyexit.runtime.heads import EXIT

    steer_heads(model_with_heads, EXIT, 5.0)  # layer 1 exits with p ~ 0.99: 0.5 fires, "off" never does
    assert threshold_sweep.main(["--model", str(model_with_heads), "--limit", "2", "exit_thresholds=[0.5, 1.0]",
                                 "stop_thresholds=[0.5]", "max_new_tokens=4", "max_prompt_tokens=20", "threads=1"]) == 0
    out = tmp_path / "results/threshold_sweep"
    result = json.loads((out / "results.json").read_text())
    rows = {r["point"]: r for r in result["rows"]}
    L = result["n_layer"]
    assert set(rows) - {"exit 0.5", "exit off", "stop 0.5"} == {next(p for p in rows if p.startswith("chosen ("))}
    # every token after the first (which the prefill computes at full depth) exits at layer 1
    assert 1 < rows["exit 0.5"]["mean_layers"] < L and rows["exit 0.5"]["layers_skipped"] > 0
    assert rows["exit off"]["mean_layers"] == L and rows["exit off"]["identical_to_full"] == 1.0
    assert all(r["speedup"] > 0 and 0 <= r["rouge_l"] <= 1 and isinstance(r["pareto"], bool) for r in rows.values())
    # (whether any point is on the front depends on timings: under load every point can be slower than full)
    assert (out / "pareto.png").stat().st_size > 0 and "layers skipped" in (out / "results.md").read_text()
    import summarize

    summary = summarize.section(tmp_path / "results")  # the README section is built from these files, not typed
    assert "layers skipped at the chosen thresholds" in summary and "Stop analysis | [stop_analysis/results.md]" in summary
    assert f"{rows[next(p for p in rows if p.startswith('chosen ('))]['layers_skipped']:.2f}/{L}" in summary


def test_pareto_front_counts_full_as_a_competitor():
    from threshold_sweep import pareto

    rows = [{"point": "a", "speedup": 1.2, "rouge_l": 0.5}, {"point": "b", "speedup": 1.1, "rouge_l": 0.4},
            {"point": "c", "speedup": 0.9, "rouge_l": 0.6}, {"point": "d", "speedup": 1.3, "rouge_l": 0.3},
            {"point": "e", "speedup": 0.95, "rouge_l": 0.5}]
    # b is beaten by a; e by full itself (speed 1, ROUGE-L 0.55); c is slower than full but scores higher
    assert pareto(rows, full_rouge=0.55) == ["a", "c", "d"]


def test_threshold_sweep_refuses_bad_threshold(model_with_heads, capsys):
    import threshold_sweep

    assert threshold_sweep.main(["--model", str(model_with_heads), "--limit", "1", "exit_thresholds=[1.5]"]) == 2
    assert "exit threshold must be a number in [0, 1]" in capsys.readouterr().err


def test_stop_analysis_limit_run(model_with_heads, tmp_path):
    import stop_analysis
    from earlyexit.runtime.heads import STOP

    steer_heads(model_with_heads, STOP, 5.0)  # p(stop) ~ 0.99 at layer 1: 0.5 stops every prompt at once, 0.999 none
    assert stop_analysis.main(["--model", str(model_with_heads), "--limit", "3", "stop_thresholds=[0.5, 0.999]",
                               "max_new_tokens=4", "max_prompt_tokens=20", "threads=1"]) == 0
    result = json.loads((tmp_path / "results/stop_analysis/results.json").read_text())
    low, high = result["rows"]
    assert low["stopped"] == 1.0 and low["tokens_saved"] == 1.0 and low["empty_after_stop"] == 1.0
    assert high["stopped"] == 0.0 and high["tokens_saved"] == 0.0 and high["precision"] is None
    assert high["acceptable_with_stop"] == high["acceptable_without_stop"] and result["kept_parts_differing_from_full"] == 0


def test_stop_stats_counts_by_hand():
    import stop_analysis

    full = [[1, 2, 3], [1, 2, 3], [4, 5, 6]]
    refs = [[1, 2, 3], [1, 9, 3], [4, 5, 6]]
    kept = [[1], [1], [4, 5, 6]]  # prompt 0 stopped needlessly, prompt 1 stopped right before its wrong token
    stats = stop_analysis.stop_stats(full, refs, kept, [True, True, False])
    assert stats["precision"] == 0.5 and stats["strict_precision"] == 0.5
    assert stats["recall"] == 1.0 and stats["clean_recall"] == 1.0
    assert stats["tokens_saved"] == 4 / 9
    assert stats["acceptable_without_stop"] == 2 / 3 and stats["acceptable_with_stop"] == 1.0 and stats["turned_acceptable"] == 1


def test_member_completion_limit_run(model_with_heads, tmp_path):
    import member_completion
    from earlyexit.runtime.heads import EXIT

    steer_heads(model_with_heads, EXIT, 5.0)
    assert member_completion.main(["--model", str(model_with_heads), "--limit", "6", "seq_len=32", "stride=16",
                                   "exit_thresholds=[0.5, 1.0]"]) == 0
    result = json.loads((tmp_path / "results/member_completion/results.json").read_text())
    rows = {r["exit_threshold"]: r for r in result["early_exit"]}
    assert result["sites_scored"] == 6 and rows[0.5]["mean_layers"] == 1 and rows[1.0]["mean_layers"] == result["n_layer"]
    assert rows[1.0]["top1"] == result["full"]["top1"] and rows[0.5]["top1"] == result["per_layer_top1"][0]
    assert 0 < result["full"]["mrr"] <= 1


def test_member_sites_need_a_token_boundary_after_the_dot(tiny_tokenizer):
    import member_completion

    text = "self.items.append(x)\nobj._private\n(a).b\n1.5\n"
    ids, positions, merged = member_completion.member_sites(text, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == text
    for p in positions:
        assert tiny_tokenizer.decode(ids[:p + 1]).endswith(".") and tiny_tokenizer.decode(ids[p + 1:p + 2])[0].isalpha()
    assert merged >= 1 and len(positions) + merged == 4  # items, append, _private, b; never the float


def test_scripts_take_other_evaluation_data(model_with_heads, tmp_path):
    import json as _json

    import member_completion

    rows = [{"path": f"x{i}.py", "content": f"self.alpha{i}.beta(gamma)\nobj{i}.delta.epsilon()\n"} for i in range(3)]
    (tmp_path / "eval.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    assert member_completion.main(["--model", str(model_with_heads), "--data", str(tmp_path / "eval.jsonl"), "seq_len=32", "stride=16"]) == 0
    result = _json.loads((tmp_path / "results/member_completion/results.json").read_text())
    assert result["stamp"]["config"]["data"] == str(tmp_path / "eval.jsonl") and result["sites_found"] + result["merged_with_dot_skipped"] == 12
    assert member_completion.main(["--model", str(model_with_heads), "--data", str(tmp_path / "none.jsonl")]) == 2


def test_decode_profile_limit_run(model_with_heads, tmp_path):
    import decode_profile

    assert decode_profile.main(["--model", str(model_with_heads), "--no-compile", "--tokens", "3", "--rounds", "1", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "results/decode_profile/results.json").read_text())
    assert [r["variant"].split(" (")[0] for r in result["rows"]] == [
        "eager full-depth step", "fp32 lean full-depth step", "int8-weight full-depth step", "int8-weight lean full-depth step",
        "int8-weight lean greedy step", "fp32 early-exit step", "int8-weight early-exit step"]
    assert set(result["profiles"]) == {"eager full depth", "fp32 lean full depth", "int8 lean full depth",
                                       *(r["variant"].split(" step")[0] for r in result["rows"][-2:])}
    assert all(p and all(v["calls_per_token"] > 0 for v in p.values()) for p in result["profiles"].values())
    assert result["rows"][0]["vs_eager"] == 1.0 and all(r["median_ms"] > 0 for r in result["rows"])
    assert result["profile_top_ops"] and abs(sum(t["share"] for t in result["profile_top_ops"])) <= 1.0 + 1e-9
    paused = result["after_a_pause"]
    assert list(paused) == ["no pause", "after 40 ms asleep"] and all(len(row) == 8 and min(row) > 0 for row in paused.values())
    from earlyexit.runtime import native

    if native.extension() is not None:  # the native steps' own phase timer, where the steps are native
        phases = result["native_phases"]
        assert {"fp32 full depth", "int8 full depth"} <= set(phases)
        for p in phases.values():
            timed = sum(v["ms_per_token"] for v in p["phases"].values())
            assert 0 < timed <= p["measured_ms_per_token"] * 1.05 and p["phases"]["QKV projection"]["calls_per_token"] >= 1


def test_recipe_sweep_runs_train_lm_per_point(tmp_path, monkeypatch, capsys):
    import recipe_sweep
    import yaml

    from earlyexit.training.train_lm import main as train_lm
    from test_train_lm import tiny_recipe

    corpus = make_corpus(tmp_path)
    assert train_lm(tiny_recipe(tmp_path, corpus, max_steps=1)) == 0  # builds the tokenizer and token caches
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sources": [str(corpus)], "vocab_size": 300, "validation_fraction": 0.2, "test_fraction": 0.2}))
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    args = [f"data_dir={tmp_path / 'run'}", f"recipe={recipe}", "steps=3", "warmup_steps=1", "seq_len=16", "batch_size=2",
            "eval_windows=2", "base_shape=1x32", "learning_rates=[0.001, 0.01]", "shapes=[2x32]", "threads=1"]
    assert recipe_sweep.main(args) == 0
    result = json.loads((tmp_path / "results/recipe_sweep/results.json").read_text())
    rows = result["rows"]
    assert [(r["sweep"], r["shape"]) for r in rows] == [("learning rate", "1x32")] * 2 + [("shape", "2x32")]
    assert len({r["val_loss"] for r in rows}) == 3 and all(r["tokens"] == 3 * 2 * 16 for r in rows)
    assert result["best_lr"] == min(rows[:2], key=lambda r: r["val_loss"])["lr"] == rows[2]["lr"]
    assert (tmp_path / "results/recipe_sweep/recipe_sweep.png").stat().st_size > 0
    capsys.readouterr()
    assert recipe_sweep.main([*args, "shapes=[7x40]"]) == 2 and "multiple of 32" in capsys.readouterr().err


def test_schedule_sweep_keeps_tokens_seen_and_runs_the_shared_baseline_once(tmp_path, monkeypatch, capsys):
    import schedule_sweep
    import yaml

    from earlyexit.training.train_lm import main as train_lm
    from test_train_lm import tiny_recipe

    corpus = make_corpus(tmp_path)
    assert train_lm(tiny_recipe(tmp_path, corpus, max_steps=1)) == 0  # builds the tokenizer and token caches
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sources": [str(corpus)], "vocab_size": 300, "validation_fraction": 0.2, "test_fraction": 0.2}))
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    args = [f"data_dir={tmp_path / 'run'}", f"recipe={recipe}", "steps=4", "warmup_steps=2", "seq_len=16", "batch_size=2",
            "eval_windows=2", "shape=1x32", "lr=0.01", "warmups=[1, 2]", "grad_accums=[1, 2]", "threads=1"]
    assert schedule_sweep.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("warm-up 2, accumulation 1:") == 1  # the baseline (base warm-up, no accumulation) runs once
    result = json.loads((tmp_path / "results/schedule_sweep/results.json").read_text())
    rows = result["rows"]
    assert [(r["sweep"], r["warmup_steps"], r["grad_accum"], r["steps"]) for r in rows] == [
        ("warm-up", 1, 1, 4), ("warm-up", 2, 1, 4), ("effective batch", 2, 1, 4), ("effective batch", 1, 2, 2)]
    assert all(r["tokens"] == 4 * 2 * 16 for r in rows)  # accumulation keeps the tokens seen
    assert rows[1]["val_loss"] == rows[2]["val_loss"] and rows[3]["effective_batch"] == 4
    assert result["best_warmup"] == min(rows[:2], key=lambda r: r["val_loss"])["warmup_steps"]
    assert (tmp_path / "results/schedule_sweep/schedule_sweep.png").stat().st_size > 0
    assert schedule_sweep.main([*args, "warmups=[4]"]) == 2 and "warmups must be" in capsys.readouterr().err


def test_vocab_sweep_trains_a_tokenizer_and_a_proxy_per_size(tmp_path, monkeypatch, capsys):
    import vocab_sweep
    import yaml

    corpus = make_corpus(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sources": [str(corpus)], "validation_fraction": 0.2, "test_fraction": 0.2}))
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    args = [f"recipe={recipe}", "vocab_sizes=[280, 400]", "sample_bytes=3000", "shape=1x32", "steps=3", "warmup_steps=1",
            "seq_len=16", "batch_size=2", "eval_windows=2", "threads=1"]
    assert vocab_sweep.main(args) == 0
    result = json.loads((tmp_path / "results/vocab_sweep/results.json").read_text())
    small, large = result["rows"]
    assert small["vocab_size"] < large["vocab_size"] <= 400  # BPE stops early when the sample runs out of merges
    assert 1 < small["bytes_per_token"] < large["bytes_per_token"]  # more merges pack more text per token
    assert small["val_nats_per_byte"] == pytest.approx(small["val_loss"] / small["bytes_per_token"])
    assert all(r["tokens"] == 3 * 2 * 16 for r in result["rows"]) and small["train_bytes_seen"] < large["train_bytes_seen"]
    assert 3000 <= result["sample_bytes"] and result["sample_files"] < 30 * 0.6 + 1  # a sample of the training split
    assert ", 1 threads," in result["stamp"]["machine"]  # what the runs used, not the process default
    assert (tmp_path / "results/vocab_sweep/vocab_sweep.png").stat().st_size > 0
    capsys.readouterr()
    assert vocab_sweep.main([*args, "vocab_sizes=[100]"]) == 2 and "vocab_sizes" in capsys.readouterr().err


def test_quality_curve_scores_each_checkpoint(tmp_path, monkeypatch, capsys):
    import quality_curve
    import yaml

    from earlyexit.training.train_lm import main as train_lm
    from test_train_lm import tiny_recipe

    corpus = make_corpus(tmp_path)
    recipe = tiny_recipe(tmp_path, corpus, max_steps=2)
    assert train_lm(recipe) == 0
    first = tmp_path / "first.pt"
    (tmp_path / "run/checkpoint.pt").rename(first)
    assert train_lm(["--resume-from", str(first), *recipe, "max_steps=4"]) == 0
    config = tmp_path / "recipe.yaml"  # the recipe as a config file, as the phases' configs are
    config.write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in recipe)} | {"sources": [str(corpus)]}))
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    points = f"points=[[{config}, {first}], [{config}, {tmp_path / 'run/checkpoint.pt'}]]"
    assert quality_curve.main([points, "line_examples=4", "max_line_tokens=3"]) == 0
    result = json.loads((tmp_path / "results/quality_curve/results.json").read_text())
    rows = result["rows"]
    assert [r["step"] for r in rows] == [2, 4] and all(r["examples"] == 4 and 0 <= r["exact_match"] <= 1 for r in rows)
    assert all(r["test_split_sha256"] == result["test_split_sha256"] and r["scored_at"] is None for r in rows)
    assert all(len(r["exact"]) == 4 and r["exact"].count("1") == round(4 * r["exact_match"]) for r in rows)
    assert [(c["from_step"], c["to_step"]) for c in result["paired"]] == [(2, 4)]  # each point against the one before
    assert (tmp_path / "results/quality_curve/quality_curve.png").stat().st_size > 0

    # the export (a directory) scores like the checkpoint it was written from
    export_point = f"points=[[{config}, {first}], [{config}, {tmp_path / 'run/export'}]]"
    assert quality_curve.main([export_point, "line_examples=4", "max_line_tokens=3"]) == 0
    exported = json.loads((tmp_path / "results/quality_curve/results.json").read_text())["rows"][1]
    assert exported["step"] == 4 and exported["context"] == 32  # the export keeps the trained positions only
    assert exported["edit_similarity"] == pytest.approx(rows[1]["edit_similarity"], abs=0.1)  # fp16 weights, same model

    # a checkpoint gone from this machine keeps its earlier row, marked as such; with other settings it cannot
    first.rename(tmp_path / "gone.pt")
    assert quality_curve.main([export_point, "line_examples=4", "max_line_tokens=3"]) == 0
    kept = json.loads((tmp_path / "results/quality_curve/results.json").read_text())["rows"]
    assert {k: v for k, v in kept[0].items() if k != "scored_at"} == {k: v for k, v in rows[0].items() if k != "scored_at"}
    assert kept[0]["scored_at"] and kept[1]["scored_at"] is None
    assert "earlier, at" in (tmp_path / "results/quality_curve/results.md").read_text()
    capsys.readouterr()
    assert quality_curve.main([export_point, "line_examples=5", "max_line_tokens=3"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert quality_curve.main([export_point, "line_examples=4", "max_line_tokens=3", "healing_mode=word"]) == 2  # other healing
    assert "checkpoint not found" in capsys.readouterr().err
    written = tmp_path / "results/quality_curve/results.json"  # results from before the setting existed: healed one token
    old = json.loads(written.read_text())
    del old["stamp"]["config"]["healing_mode"]
    written.write_text(json.dumps(old))
    assert quality_curve.main([export_point, "line_examples=4", "max_line_tokens=3"]) == 0
    assert quality_curve.main([f"points=[[{config}, {tmp_path / 'missing.pt'}]]", "line_examples=4"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_ngram_cache_sweep_limit_run(model_with_heads, tmp_path, capsys):
    import ngram_cache_sweep
    from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT, SKIP_RECENT

    card = tmp_path / "card.yaml"
    card.write_text("sample_prompts: ['def f(', 'class A:']\nsample_max_new_tokens: 6\n")
    assert ngram_cache_sweep.main(["--model", str(model_with_heads), "--limit", "4", "weights=[0, 1.0]", "skip_recent=[0, 8]",
                                   f"samples_from={card}", "plot=false"]) == 0
    result = json.loads((tmp_path / "results/ngram_cache_sweep/results.json").read_text())
    rows = {(r["sweep"], r["prompt"], r["weight"], r["skip_recent"]): r for r in result["rows"]}
    assert set(rows) == {("weight", k, w, SKIP_RECENT) for k in ("whole file", "card") for w in (0.0, 1.0)} | \
        {("skip_recent", "whole file", DEFAULT_WEIGHT, k) for k in (0, 8)}
    assert all(len(r["exact"]) == 4 and 0 <= r["sample_loops"] <= 2 for r in rows.values()) and result["samples"] == 2
    assert rows[("weight", "card", 0.0, SKIP_RECENT)]["against_no_cache"] == {"gained": 0, "lost": 0, "p_value": 1.0}
    assert result["best_weight"] in (0.0, 1.0) and result["best_skip_recent"] in (0, 8)
    import summarize

    best = rows[("weight", "whole file", result["best_weight"], SKIP_RECENT)]  # the weight sweep's row, not the skip sweep's
    assert f"edit similarity from {rows[('weight', 'whole file', 0.0, SKIP_RECENT)]['edit_similarity']:.3f} to " \
           f"{best['edit_similarity']:.3f}" in summarize.section(tmp_path / "results")
    assert ngram_cache_sweep.main(["--model", str(model_with_heads), "weights=[0.3]"]) == 2  # no baseline to compare with
    assert ngram_cache_sweep.main(["--model", str(model_with_heads), "weights=[0, 1.5]"]) == 2
    assert "n-gram cache weight must be a number in [0, 1], got 1.5" in capsys.readouterr().err


def test_chosen_skip_recent_is_the_best_that_loops_no_more_than_no_cache():
    from ngram_cache_sweep import chosen

    def row(sweep, weight, skip, es, loops):
        return {"sweep": sweep, "prompt": "whole file", "weight": weight, "skip_recent": skip, "edit_similarity": es, "sample_loops": loops}

    rows = [row("weight", 0.0, 64, 0.50, 8), row("weight", 0.3, 64, 0.55, 8), row("weight", 0.5, 64, 0.54, 9),
            row("skip_recent", 0.3, 0, 0.56, 10), row("skip_recent", 0.3, 64, 0.55, 8), row("skip_recent", 0.3, 128, 0.53, 7)]
    assert chosen(rows) == {"best_weight": 0.3, "best_skip_recent": 64}  # 0 scores higher but loops more


def test_the_caches_defaults_are_the_committed_sweeps_choice():
    from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT, SKIP_RECENT

    committed = json.loads((Path(__file__).resolve().parents[1] / "experiments/results/ngram_cache_sweep/results.json").read_text())
    assert (committed["best_weight"], committed["best_skip_recent"]) == (DEFAULT_WEIGHT, SKIP_RECENT)
    assert (committed["default_weight"], committed["default_skip_recent"]) == (DEFAULT_WEIGHT, SKIP_RECENT)  # swept around them


def test_exit_training_compares_two_models_on_the_same_tokens(model_with_heads, tmp_path):
    import exit_training

    args = [f"before={model_with_heads}", f"after={model_with_heads}", "seq_len=16", "--limit", "3"]
    assert exit_training.main(args) == 0
    out = tmp_path / "results/exit_training"
    result = json.loads((out / "results.json").read_text())
    before, after = result["before"], result["after"]
    assert before["tokens"] == after["tokens"] == 3 * 16
    for key in ("right_at_layer_1", "oracle_mean_depth", "test_loss", "right_by_layer", "agree_by_layer"):
        assert before[key] == after[key]  # one model against itself: the same figures
    L = before["n_layer"]
    assert 1 <= before["oracle_mean_depth"] <= L and before["agree_by_layer"][-1] == 1.0
    assert before["right_by_layer"] == sorted(before["right_by_layer"])  # cumulative
    assert before["controller_mean_layers"] is None  # the tiny heads were never calibrated
    assert (out / "by_layer.png").stat().st_size > 0 and "oracle mean depth" in (out / "results.md").read_text()


def test_experiment_scripts_measure_this_checkouts_earlyexit_not_an_installed_copy(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(root / 'experiments')!r}); import common, earlyexit, transformers; "
            "print(earlyexit.__file__)")
    fake = tmp_path / "installed" / "earlyexit"  # an older copy ahead of the checkout on sys.path, as site-packages' would be
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the installed copy was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (root / "earlyexit" / "__init__.py").resolve()


def test_listing_the_benchmarks_engines_builds_none_of_them(model_with_heads):
    """A memory probe builds one engine in a fresh process: naming the others must not load their weights."""
    import benchmark_generate

    from earlyexit.runtime.loading import load_tokenizer

    parts = benchmark_generate.EngineParts(model_with_heads, load_tokenizer(model_with_heads), benchmark_generate.parse_args([]))
    assert "earlyexit full" in parts.factories()
    assert not {"ours", "hf", "heads", "int8"} & set(vars(parts))  # cached_property values live in the instance dict


def test_serve_load_limit_run(model_with_heads, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import serve_load

    assert serve_load.main(["--model", str(model_with_heads), "--prompts", "3", "--clients", "1,2", "--max-tokens", "4",
                            "--max-prompt-tokens", "24", "--threads", "1", "--no-peer", "--sessions", "2", "--keystrokes", "3",
                            "--step", "4"]) == 0
    out = tmp_path / "results/serve_load"
    result = json.loads((out / "results.json").read_text())
    assert [(r["server"], r["clients"]) for r in result["rows"]] == [
        ("ours, batched", 1), ("ours, batched", 2), ("ours, one at a time", 1), ("ours, one at a time", 2)]
    assert all(r["requests"] == 3 and not r["errors"] and r["requests_per_s"] > 0 for r in result["rows"])
    assert result["identical_batched_vs_alone"] == 1.0 and result["peer_skipped"] == "--no-peer"
    assert [t["server"] for t in result["typing"]] == ["ours, batched", "ours, no prompt cache"]
    assert all(t["requests"] == 2 * 2 for t in result["typing"]) and result["typing_identical_cached_vs_not"] is not None
    assert (out / "load.png").stat().st_size > 0 and "skipped (--no-peer)" in (out / "results.md").read_text()


def test_exit_signals_limit_run(model_with_heads, tmp_path):
    import exit_signals

    assert exit_signals.main(["--model", str(model_with_heads), "--windows", "4", "--window-tokens", "16", "--threads", "1",
                              "--targets", "0.9"]) == 0
    out = tmp_path / "results/exit_signals"
    r = json.loads((out / "results.json").read_text())["models"][0]
    L = r["n_layer"]
    assert set(r["exitable"]["0.9"]) == {"controller", "max_prob", "margin", "probe"}
    assert all(len(v) == L - 1 and all(0 <= x <= 1 for x in v) for v in r["exitable"]["0.9"].values())
    assert r["rules"][0]["rule"].startswith("controller") and all(1 <= x["mean_layers"] <= L for x in r["rules"])
    assert (out / "exitable.png").stat().st_size > 0


def test_confidence_rule_calibration_writes_thresholds_the_runtime_takes(model_with_heads):
    from earlyexit.runtime.heads import load_heads
    from earlyexit.runtime.loading import load_runtime_model
    from earlyexit.runtime.policies import EarlyExit
    from earlyexit.training.confidence_rule import main

    assert main(["--model", str(model_with_heads), "windows=4", "window_tokens=16", "threads=1", "target=0.5"]) == 0
    model, _ = load_runtime_model(model_with_heads)
    heads = load_heads(model_with_heads, model)
    result = heads.cfg.calibration["confidence_rule"]
    assert result["chosen"] == (heads.cfg.exit_confidence or {}) and result["split"] == "validation"
    assert result["selection"][0]["asked"] == [] and 1 <= result["scored"]["mean_layers"] <= model.dims.n_layer
    expected = "confidence" if heads.cfg.exit_confidence is not None else "controller"
    assert EarlyExit(model, heads).exit_rule == expected
    assert main(["--model", str(model_with_heads), "windows=4", "window_tokens=16", "threads=1", "weights=int8", "timing_rounds=5"]) == 0
    heads = load_heads(model_with_heads, model)
    assert isinstance(heads.cfg.exit_confidence_int8, dict) and "confidence_rule_int8" in heads.cfg.calibration


def test_best_threshold_takes_the_largest_share_at_the_precision():
    from earlyexit.training.confidence_rule import best_threshold

    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    hits = torch.tensor([True, True, False, True, False])
    assert best_threshold(score, hits, 1.0) == pytest.approx((0.8, 0.4))
    assert best_threshold(score, hits, 0.75) == pytest.approx((0.6, 0.8))
    assert best_threshold(score, torch.zeros(5, dtype=torch.bool), 0.5) == (float("inf"), 0.0)


def test_fuzz_limit_run_covers_every_target_and_records_what_it_found(tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_RESULTS", str(tmp_path / "results"))
    import fuzz

    assert fuzz.main(["--minutes", "0.25", "--round-examples", "10"]) == 0
    result = json.loads((tmp_path / "results/fuzz/results.json").read_text())
    assert [r["target"] for r in result["rows"]] == list(fuzz.TARGETS)
    assert all(r["examples"] > 0 for r in result["rows"]) and result["findings"] == 0


def test_fuzz_records_a_finding_once_with_where_it_was_raised(monkeypatch):
    import fuzz
    from hypothesis import strategies as st

    def broken(ctx):
        def check(x):
            if x > 5:
                fuzz.expect_refusal_or_result(lambda: 1 / 0)
        return check, (st.integers(0, 10),)

    monkeypatch.setattr(fuzz, "prompt_target", broken, raising=True)
    row = fuzz.run_target("prompt", {}, 1.0, 0, 20)
    assert [f["error"] for f in row["findings"]] == ["ZeroDivisionError: division by zero"] and row["examples"] > 0
