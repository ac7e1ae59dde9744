"""`python -m earlyexit.generate`: output formats and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from earlyexit.cli import main


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed while saving checkpoints
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_text_ids_and_timings(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["prompt"] == "def add(a, b):"
    assert len(result["token_ids"]) == 5 and result["finish_reason"] == "max_tokens"
    assert len(result["token_ms"]) == 4 and result["prefill_ms"] > 0
    assert result["exit_layers"] == [3] * 5


def test_plain_output_echoes_prompt_and_completion(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "class Stack:", "--model", str(tiny_model_dir), "--max-new-tokens", "3")
    assert code == 0 and out.startswith("class Stack:")
    assert "3 tokens" in err
    assert "ended by max_tokens: --max-new-tokens reached" in err


def test_every_finish_reason_has_a_note_for_the_command_line():
    from earlyexit.runtime.decoding import FINISH_REASONS
    from earlyexit.cli import FINISH_NOTES

    assert set(FINISH_NOTES) == set(FINISH_REASONS)


def test_prompt_from_file_and_stdin(capsys, monkeypatch, tmp_path, tiny_model_dir):
    f = tmp_path / "p.py"
    f.write_text("import os\n")
    code, out, _ = run_cli(capsys, "--file", str(f), "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "import os\n"

    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"for i in")))  # a pipe, not a terminal
    code, out, _ = run_cli(capsys, "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "for i in"


def corrupt_weights_dir(tmp_path, tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return tiny_model_dir


def llama_dir(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("empty", [""], "prompt is empty"),
        ("zero", ["x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        ("negative", ["x", "--max-new-tokens", "-4"], "max_new_tokens must be a positive integer"),
        ("too_long", ["y = 2\n" * 300, "--max-new-tokens", "8"], "context of 96"),
        ("missing_model", ["x", "--model", "{tmp}/nowhere"], "model directory not found"),
        ("not_gpt2", ["x", "--model", "{llama}"], "'llama' model"),
        ("no_config", ["x", "--model", "{tmp}"], "no config.json"),
        ("corrupt", ["x", "--model", "{corrupt}"], "cannot load the model weights"),
        ("non_utf8_file", ["--file", "{latin1}"], "not UTF-8"),
        ("missing_file", ["--file", "{tmp}/missing.py"], "cannot read prompt file"),
        ("exit_threshold", ["x", "--exit-threshold", "1.5"], "exit threshold must be a number in [0, 1]"),
        ("stop_threshold", ["x", "--stop-threshold", "-0.2"], "stop threshold must be a number in [0, 1]"),
        ("no_heads", ["x", "--mode", "early-exit"], "no exit heads"),
        ("no_heads_lossless", ["x", "--mode", "lossless"], "no exit heads"),
        ("max_draft", ["x", "--mode", "lossless", "--max-draft", "0"], "--max-draft must be a positive integer"),
        ("max_draft_not_lossless", ["x", "--mode", "full", "--max-draft", "4"], "apply to --mode lossless only"),
        ("draft_not_lossless", ["x", "--draft", "same"], "apply to --mode lossless only"),
        ("draft_layers_not_lossless", ["x", "--draft-layers", "3"], "apply to --mode lossless only"),
        ("unknown_flag", ["x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("bad_int", ["x", "--max-new-tokens", "many"], "invalid int value"),
        ("lone_surrogate", ["def f(\udcff):"], "lone surrogate"),
        ("empty_stop", ["x", "--stop", ""], "stop strings must be non-empty"),
        ("huge_file", ["--file", "{huge}"], "more than 4,194,304 bytes"),
        ("no_such_home", ["x", "--model", "~no_such_user_zz/m"], "model directory not found"),
        ("int8_lossless", ["x", "--mode", "lossless", "--weights", "int8"], "--weights int8 does not apply to lossless"),
        ("cache_weight", ["x", "--ngram-cache", "1.5"], "n-gram cache weight must be a number in [0, 1], got 1.5"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir, case, args, message):
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    huge = tmp_path / "huge.py"
    huge.write_bytes(b"x" * (4 * 1024 * 1024 + 1))
    fill = {"tmp": empty, "llama": llama_dir(tmp_path), "latin1": latin1, "huge": huge}
    if case == "corrupt":
        fill["corrupt"] = corrupt_weights_dir(tmp_path, tiny_model_dir)
    args = [a.format(**fill) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1, err


def test_no_traceback_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "earlyexit.generate", "x", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "model directory not found" in proc.stderr


def heads_for(model_dir, seed=0):
    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.loading import load_hf_model
    from earlyexit.runtime.model import GPT2

    model = GPT2.from_hf(load_hf_model(model_dir))  # the backbone alone: a folder of weights needs no tokenizer
    heads = ExitHeads.for_backbone(model, rank=4)
    heads.cfg.thresholds.exit = 0.0  # exit wherever the classifier's argmax says so
    return heads


def test_early_exit_is_the_default_when_the_model_has_heads(capsys, tiny_model_dir):
    heads_for(tiny_model_dir).save(tiny_model_dir)
    code, out, _ = run_cli(capsys, "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["mode"] == "early-exit" and result["thresholds"] == {"exit": 0.0, "stop": 1.0}
    assert len(result["exit_layers"]) == 4 and all(1 <= n <= 3 for n in result["exit_layers"])
    code, out, _ = run_cli(capsys, "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--json", "--mode", "full")
    assert json.loads(out)["mode"] == "full" and json.loads(out)["exit_layers"] == [3] * 4
    code, out, err = run_cli(capsys, "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--stats")
    assert code == 0 and out.startswith("def add(a, b):")
    assert "/3" in err and "mean" in err and "skipped" in err


def test_lossless_mode_gives_full_modes_tokens(capsys, tiny_model_dir):
    heads_for(tiny_model_dir).save(tiny_model_dir)
    outs = {}
    for mode in ("full", "lossless"):
        code, out, _ = run_cli(capsys, "class Stack:", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--json", "--mode", mode)
        assert code == 0
        outs[mode] = json.loads(out)
    assert outs["lossless"]["token_ids"] == outs["full"]["token_ids"]
    assert outs["lossless"]["speculation"]["drafted"] > 0 and outs["full"]["speculation"] == {}
    assert outs["lossless"]["speculation"]["draft"] == "int8"  # the default draft of an fp32 model on the CPU
    code, out, _ = run_cli(capsys, "class Stack:", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--json",
                           "--mode", "lossless", "--draft-layers", "2")
    first = json.loads(out)
    assert code == 0 and first["token_ids"] == outs["full"]["token_ids"] and first["speculation"]["draft"] == "first 2 layers"
    code, _, err = run_cli(capsys, "x", "--model", str(tiny_model_dir), "--mode", "lossless", "--draft-layers", "9")
    assert code == 2 and "draft_layers must be an integer in [1, 2]" in err and "Traceback" not in err


def test_lossless_mode_stops_only_when_asked(capsys, tiny_model_dir):
    heads = heads_for(tiny_model_dir)
    heads.cfg.thresholds.stop = 0.34  # the heads' own stop threshold: early-exit mode's default, not lossless mode's
    heads.save(tiny_model_dir)
    outs = {}
    for name, flags in [("lossless", ["--mode", "lossless"]), ("lossless-stop", ["--mode", "lossless", "--stop-threshold", "0.34"]),
                        ("no-exits", ["--mode", "early-exit", "--exit-threshold", "1"])]:
        code, out, err = run_cli(capsys, "class Stack:", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--json", *flags)
        assert code == 0, err
        outs[name] = json.loads(out)
    assert len(outs["lossless"]["token_ids"]) == 12 and outs["no-exits"]["finish_reason"] == "stop"
    for key in ("token_ids", "finish_reason"):
        assert outs["lossless-stop"][key] == outs["no-exits"][key]


def test_int8_weights_run_full_and_early_exit(capsys, tiny_model_dir):
    heads_for(tiny_model_dir).save(tiny_model_dir)
    for mode in ("full", "early-exit"):
        code, out, err = run_cli(capsys, "class Stack:", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--json",
                                 "--mode", mode, "--weights", "int8")
        assert code == 0, err
        result = json.loads(out)
        assert code == 0 and result["weights"] == "int8" and len(result["token_ids"]) == 6 and result["mode"] == mode


def test_heads_of_another_backbone_are_refused(capsys, tmp_path, tiny_model_dir):
    from conftest import make_tiny_hf

    other = tmp_path / "other"
    make_tiny_hf(300, seed=99).save_pretrained(other)
    heads_for(other).save(tiny_model_dir)
    code, out, err = run_cli(capsys, "x", "--model", str(tiny_model_dir), "--mode", "early-exit")
    assert code == 2 and "different backbone weights" in err and err.count("\n") == 1


def test_repetition_stop_is_on_by_default_with_a_flag_to_turn_it_off(capsys, tiny_model_dir):
    # the tiny random model writes blank lines without end: a loop the CLI cuts
    code, out, _ = run_cli(capsys, "import os\n", "--model", str(tiny_model_dir), "--max-new-tokens", "30", "--json", "--mode", "full")
    stopped = json.loads(out)
    assert code == 0 and stopped["finish_reason"] == "repetition"
    code, out, _ = run_cli(capsys, "import os\n", "--model", str(tiny_model_dir), "--max-new-tokens", "30", "--json", "--mode", "full",
                           "--no-repetition-stop")
    ran_on = json.loads(out)
    assert ran_on["finish_reason"] == "max_tokens" and ran_on["token_ids"][:len(stopped["token_ids"])] == stopped["token_ids"]


def test_ngram_cache_is_on_by_default_in_every_mode_with_a_flag_to_turn_it_off(capsys, tiny_model_dir):
    from earlyexit.runtime.ngram_cache import DEFAULT_WEIGHT

    heads_for(tiny_model_dir).save(tiny_model_dir)
    # a long file: the cache searches the part --truncate-prompt drops (the default skips only the last tokens)
    prompt = "def push(self, item):\n    self.items.append(item)\n\n" * 8 + "def push(self, it"
    outs = {}
    for mode in ("full", "lossless"):
        for weight in (None, "0", "1"):
            code, out, _ = run_cli(capsys, prompt, "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--json", "--mode", mode,
                                   "--truncate-prompt", *(["--ngram-cache", weight] if weight else []))
            assert code == 0
            outs[mode, weight] = json.loads(out)
    assert outs["full", None]["ngram_cache"] == DEFAULT_WEIGHT and outs["full", "0"]["ngram_cache"] == 0.0
    assert outs["full", "1"]["text"].startswith("em):\n")  # weight 1 copies what followed earlier
    assert outs["full", "1"]["token_ids"] != outs["full", "0"]["token_ids"]
    for weight in (None, "0", "1"):  # lossless writes full mode's tokens, cache included
        assert outs["lossless", weight]["token_ids"] == outs["full", weight]["token_ids"]


def test_escapes_in_the_prompt_and_stop_are_processed_unless_asked_not_to(capsys, tiny_model_dir):
    from earlyexit.cli import unescape

    assert unescape(r"import os\n\tx = '\\n' \q") == "import os\n\tx = '\\n' \\q"
    code, out, _ = run_cli(capsys, r"import os\n", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "import os\n"
    code, out, _ = run_cli(capsys, r"import os\n", "--no-escape", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "import os\\n"


def test_output_cut_by_a_closed_pipe_ends_quietly(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(f'"{sys.executable}" -m earlyexit.generate "x = 1" --model "{tiny_model_dir}" --max-new-tokens 4 --json | head -c 1',
                          shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
