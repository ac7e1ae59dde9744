"""The catalogue of bad input: every case a careless user or an attacker has tried, in one table per front end.

Each CLI case (`python -m earlyexit.generate`, `python -m earlyexit.serve`) must end with exit code 2 and exactly one
line on standard error, `error: ...` holding the fragment; each library case must raise `EarlyExitError` holding it
(never a traceback from inside torch, never a silent wrong result); each in well under 10 seconds. The HTTP server's
own cases are in tests/test_server.py; hypothesis explores the spaces between these (tests/test_properties.py).
"""

import io
import sys
import time

import pytest
import torch

from earlyexit.errors import EarlyExitError

from conftest import make_tiny_hf

BIG = 5 * 1024 * 1024  # past the 4 MiB bound on a prompt


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny checkpoint with its tokenizer and no exit heads (context 96)."""
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_hf(len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("files")
    (d / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (d / "empty.py").write_bytes(b"")
    (d / "big.py").write_bytes(b"x" * BIG)
    (d / "empty_model").mkdir()
    bad_json = d / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    torn = d / "torn_weights"
    torn.mkdir()
    for f in tiny_dir.iterdir():
        (torn / f.name).write_bytes(f.read_bytes())
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    return d


def cli_cases():
    """(id, argv with {tiny}/{files} placeholders, stdin bytes or None, message fragment)."""
    return [
        ("empty prompt", [""], None, "prompt is empty"),
        ("zero tokens", ["x", "--max-new-tokens", "0"], None, "max_new_tokens must be a positive integer"),
        ("negative tokens", ["x", "--max-new-tokens", "-5"], None, "max_new_tokens must be a positive integer"),
        ("non-integer tokens", ["x", "--max-new-tokens", "abc"], None, "invalid int value"),
        ("exit threshold above 1", ["x", "--exit-threshold", "1.5"], None, "exit threshold must be a number in [0, 1]"),
        ("exit threshold below 0", ["x", "--exit-threshold", "-0.1"], None, "exit threshold must be a number in [0, 1]"),
        ("exit threshold NaN", ["x", "--exit-threshold", "nan"], None, "exit threshold must be a number in [0, 1]"),
        ("stop threshold above 1", ["x", "--stop-threshold", "2"], None, "stop threshold must be a number in [0, 1]"),
        ("target agreement of 1.5", ["x", "--target-agreement", "1.5"], None, "--target-agreement must be in (0, 1)"),
        ("target agreement and threshold", ["x", "--target-agreement", "0.9", "--exit-threshold", "0.5"], None,
         "either --exit-threshold or --target-agreement"),
        ("draft length in full mode", ["x", "--mode", "full", "--max-draft", "3"], None, "apply to --mode lossless only"),
        ("zero draft length", ["x", "--mode", "lossless", "--max-draft", "0"], None, "--max-draft must be a positive integer"),
        ("a million-token draft", ["x", "--mode", "lossless", "--max-draft", "1000000"], None, "at most the model's context"),
        ("int8 weights in lossless", ["x", "--mode", "lossless", "--weights", "int8"], None, "does not apply to lossless mode"),
        ("sampling in lossless", ["x", "--mode", "lossless", "--temperature", "0.5"], None, "does not sample"),
        ("negative temperature", ["x", "--temperature", "-1"], None, "temperature must be in [0, 100]"),
        ("huge temperature", ["x", "--temperature", "1000"], None, "temperature must be in [0, 100]"),
        ("NaN temperature", ["x", "--temperature", "nan"], None, "temperature must be a finite number"),
        ("top-p of 0", ["x", "--top-p", "0"], None, "top_p must be in (0, 1]"),
        ("top-p above 1", ["x", "--top-p", "1.5"], None, "top_p must be in (0, 1]"),
        ("negative seed", ["x", "--temperature", "1", "--seed", "-1"], None, "seed must be an integer"),
        ("unknown mode", ["x", "--mode", "fast"], None, "invalid choice"),
        ("unknown weights", ["x", "--weights", "int4"], None, "invalid choice"),
        ("unknown exit rule", ["x", "--exit-rule", "sometimes"], None, "invalid choice"),
        ("unknown flag", ["x", "--turbo"], None, "unrecognized arguments"),
        ("exit layers not numbers", ["x", "--exit-rule", "controller", "--exit-layers", "a,b"], None, "--exit-layers takes 'all' or comma-separated"),
        ("exit layer past the model", ["x", "--exit-rule", "controller", "--exit-layers", "99"], None, "exit_layers must be 0-based"),
        ("exit layer 0", ["x", "--exit-rule", "controller", "--exit-layers", "0"], None, "exit_layers must be 0-based"),
        ("exit layers under the confidence rule", ["x", "--exit-layers", "3"], None, "--exit-rule controller"),
        ("target agreement under the confidence rule", ["x", "--target-agreement", "0.9"], None, "--exit-rule controller"),
        ("exit layers in full mode", ["x", "--mode", "full", "--exit-layers", "3"], None, "--exit-layers applies to --mode early-exit only"),
        ("exit layers in lossless mode", ["x", "--mode", "lossless", "--exit-layers", "3"], None, "applies to --mode early-exit only"),
        ("exit rule in full mode", ["x", "--mode", "full", "--exit-rule", "confidence"], None, "--exit-rule applies to --mode early-exit"),
        ("thresholds in full mode", ["x", "--mode", "full", "--exit-threshold", "0.5"], None, "apply to --mode early-exit only"),
        ("n-gram weight above 1", ["x", "--ngram-cache", "2"], None, "[0, 1]"),
        ("n-gram weight below 0", ["x", "--ngram-cache", "-0.5"], None, "[0, 1]"),
        ("empty stop string", ["x", "--stop", ""], None, "stop strings must be non-empty"),
        ("prompt and file", ["x", "--file", "{files}/empty.py"], None, "either as an argument or with --file"),
        ("missing file", ["--file", "{files}/missing.py"], None, "cannot read prompt file"),
        ("file is a folder", ["--file", "{files}"], None, "cannot read prompt file"),
        ("empty file", ["--file", "{files}/empty.py"], None, "prompt is empty"),
        ("non-UTF-8 file", ["--file", "{files}/latin1.py"], None, "UTF-8"),
        ("a file past 4 MiB", ["--file", "{files}/big.py"], None, "more than 4,194,304 bytes"),
        ("standard input past 4 MiB", [], b"y" * BIG, "more than 4,194,304 bytes"),
        ("non-UTF-8 standard input", [], "x = 'caf\xe9'".encode("latin-1"), "UTF-8"),
        ("empty standard input", [], b"", "prompt is empty"),
        ("a lone surrogate in argv", ["x = '\udcff'"], None, "lone surrogate"),
        ("missing model folder", ["x", "--model", "{files}/no_such_model"], None, "{files}/no_such_model"),
        ("empty model folder", ["x", "--model", "{files}/empty_model"], None, "config.json"),
        ("model config not JSON", ["x", "--model", "{files}/bad_json"], None, "bad_json"),
        ("torn weights file", ["x", "--model", "{files}/torn_weights"], None, "cannot load the model weights"),
        ("prompt past the context", ["x " * 200, "--model", "{tiny}"], None, "leaves room for"),
        ("budget past the context", ["x", "--model", "{tiny}", "--max-new-tokens", "96"], None, "smaller than the model's context (96)"),
        ("early exit without heads", ["x", "--model", "{tiny}", "--mode", "early-exit"], None, "no exit heads"),
        ("lossless without heads", ["x", "--model", "{tiny}", "--mode", "lossless"], None, "no exit heads"),
    ]


def serve_cases():
    return [
        ("port 0", ["--port", "0"], "--port must be in [1, 65535]"),
        ("port past 65535", ["--port", "70000"], "--port must be in [1, 65535]"),
        ("non-integer port", ["--port", "http"], "invalid int value"),
        ("no rows", ["--model", "{tiny}", "--max-rows", "0"], "max_rows must be an integer in [1, 4096]"),
        ("negative queue", ["--model", "{tiny}", "--max-queue", "-1"], "max_queue must be an integer in [0, 4096]"),
        ("tiny body limit", ["--max-body-bytes", "10"], "--max-body-bytes must be at least 1024"),
        ("empty API key", ["--api-key", ""], "--api-key is empty"),
        ("zero threads", ["--threads", "0"], "--threads must be a positive integer"),
        ("draft length in full mode", ["--mode", "full", "--max-draft", "3"], "--max-draft applies to --mode lossless only"),
        ("int8 weights in lossless", ["--mode", "lossless", "--weights", "int8"], "does not apply to lossless mode"),
        ("negative default temperature", ["--temperature", "-1"], "temperature must be in [0, 100]"),
        ("missing model folder", ["--model", "{files}/no_such_model"], "no_such_model"),
        ("unknown mode", ["--mode", "fast"], "invalid choice"),
        ("negative prompt cache", ["--model", "{tiny}", "--prompt-cache", "-1"], "prompt_cache_min must be an integer in [0, 4096]"),
    ]


def fill(argv, tiny_dir, files):
    return [a.replace("{tiny}", str(tiny_dir)).replace("{files}", str(files)) for a in argv]


def one_error_line(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err[-5:]
    assert fragment in err[0], err[0]


def exit_code_of(main, argv) -> int:
    """main's return code, or argparse's exit code where the parser refused the flags."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case,argv,stdin,fragment", cli_cases(), ids=[c[0] for c in cli_cases()])
def test_cli_refuses_in_one_error_line(case, argv, stdin, fragment, tiny_dir, files, capsys, monkeypatch):
    from earlyexit.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    t0 = time.perf_counter()
    assert exit_code_of(main, fill(argv, tiny_dir, files)) == 2
    one_error_line(capsys, fill([fragment], tiny_dir, files)[0])
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("case,argv,fragment", serve_cases(), ids=[c[0] for c in serve_cases()])
def test_serve_refuses_in_one_error_line(case, argv, fragment, tiny_dir, files, capsys):
    pytest.importorskip("uvicorn")
    from earlyexit.serve import main

    t0 = time.perf_counter()
    assert exit_code_of(main, fill(argv, tiny_dir, files)) == 2
    one_error_line(capsys, fragment)
    assert time.perf_counter() - t0 < 10


@pytest.fixture(scope="module")
def api(tiny_tokenizer):
    from earlyexit.runtime.heads import ExitHeads
    from earlyexit.runtime.model import GPT2

    model = GPT2.from_hf(make_tiny_hf(len(tiny_tokenizer), n_layer=4))
    return model, tiny_tokenizer, ExitHeads.for_backbone(model, rank=2).eval()


def api_cases():
    from earlyexit.runtime.batch import complete_batch
    from earlyexit.runtime.decoding import GenerationSettings, complete
    from earlyexit.runtime.heads import Thresholds, load_heads
    from earlyexit.runtime.policies import EarlyExit, check_confidence
    from earlyexit.runtime.sampling import Sampler
    from earlyexit.runtime.speculative import Lossless
    from earlyexit.server.engine import Engine

    return [
        ("empty prompt", lambda m, t, h: complete(m, t, ""), "prompt is empty"),
        ("bytes prompt", lambda m, t, h: complete(m, t, b"x = 1"), "got bytes"),
        ("an id past the vocabulary", lambda m, t, h: complete(m, t, [10**6]), "outside the model's vocabulary"),
        ("a negative id", lambda m, t, h: complete(m, t, [1, -3]), "outside the model's vocabulary"),
        ("a float id", lambda m, t, h: complete(m, t, [1.5]), "not an integer"),
        ("a bool id", lambda m, t, h: complete(m, t, [True]), "not an integer"),
        ("a 2-D tensor of ids", lambda m, t, h: complete(m, t, torch.ones(2, 3, dtype=torch.long)), "1-D integer token ids"),
        ("a float tensor", lambda m, t, h: complete(m, t, torch.ones(3)), "1-D integer token ids"),
        ("an int prompt", lambda m, t, h: complete(m, t, 7), "got int"),
        ("a lone surrogate", lambda m, t, h: complete(m, t, "x = '\udcff'"), "lone surrogate"),
        ("a prompt of 5 million characters", lambda m, t, h: complete(m, t, "x" * BIG), "more than the"),
        ("a prompt past the context", lambda m, t, h: complete(m, t, "x " * 200), "leaves room for"),
        ("a string for a policy", lambda m, t, h: complete(m, t, "x", policy="early-exit"), "policy must be"),
        ("tokens as a bool", lambda m, t, h: GenerationSettings(max_new_tokens=True), "positive integer"),
        ("stop strings of ints", lambda m, t, h: GenerationSettings(stop_strings=[1]), "stop_strings must be"),
        ("NaN temperature", lambda m, t, h: GenerationSettings(temperature=float("nan")), "finite number"),
        ("a seed past 2**63", lambda m, t, h: GenerationSettings(temperature=1.0, seed=2**64), "seed must be"),
        ("top-p of 0", lambda m, t, h: Sampler(1.0, top_p=0.0), "top_p must be in (0, 1]"),
        ("a threshold of 2", lambda m, t, h: Thresholds(exit=2.0), "exit threshold must be a number in [0, 1]"),
        ("a threshold changed to -1", lambda m, t, h: setattr(Thresholds(), "stop", -1), "stop threshold must be"),
        ("an unknown exit rule", lambda m, t, h: EarlyExit(m, h, exit_rule="vibes"), "exit_rule must be one of"),
        ("the confidence rule uncalibrated", lambda m, t, h: EarlyExit(m, h, exit_rule="confidence"), "no confidence thresholds"),
        ("a confidence layer past the model", lambda m, t, h: EarlyExit(m, h, confidence={99: 0.5}), "confidence layers must be"),
        ("a confidence of 2", lambda m, t, h: EarlyExit(m, h, confidence=2.0), "must be a number in [0, 1]"),
        ("a confidence that is text", lambda m, t, h: check_confidence("high", 4, [0]), "confidence must be a threshold"),
        ("an exit layer past the model", lambda m, t, h: EarlyExit(m, h, exit_layers=[99]), "exit_layers must be 0-based"),
        ("an exit head of int4", lambda m, t, h: EarlyExit(m, h, exit_head="int4"), "exit_head must be auto, int8 or fp32"),
        ("thresholds as a tuple", lambda m, t, h: EarlyExit(m, h, thresholds=(0.5, 0.5)), "thresholds must be a Thresholds"),
        ("heads that are not heads", lambda m, t, h: EarlyExit(m, object()), "EarlyExit needs ExitHeads"),
        ("a zero draft", lambda m, t, h: Lossless(m, h, max_draft=0), "max_draft must be a positive integer"),
        ("a draft past the context", lambda m, t, h: Lossless(m, h, max_draft=10**6), "at most the model's context"),
        ("sampling in lossless", lambda m, t, h: complete(m, t, "x", GenerationSettings(temperature=0.7), policy=Lossless(m, h, draft="same")),
         "does not sample"),
        ("a batch of no prompts", lambda m, t, h: complete_batch(m, t, []), "non-empty list"),
        ("a batch that is one string", lambda m, t, h: complete_batch(m, t, "x = 1"), "non-empty list"),
        ("a batch with an empty prompt", lambda m, t, h: complete_batch(m, t, ["x", ""]), "prompt is empty"),
        ("a server engine of no rows", lambda m, t, h: Engine(m, t, max_rows=0), "max_rows must be an integer"),
        ("a server engine with a float queue", lambda m, t, h: Engine(m, t, max_queue=2.5), "max_queue must be an integer"),
        ("heads from a folder without them", lambda m, t, h: load_heads("/nonexistent-heads", m), "no exit heads"),
        ("heads whose rank is a float (found by experiments/fuzz.py)", lambda m, t, h: load_heads(saved_heads(m, h, rank=2.5), m),
         "rank must be a non-negative integer"),
        ("heads whose width is text", lambda m, t, h: load_heads(saved_heads(m, h, n_embd="48"), m), "n_embd must be a non-negative integer"),
        ("heads whose calibration is a list", lambda m, t, h: load_heads(saved_heads(m, h, calibration=[1]), m), "calibration must be an object"),
    ]


def saved_heads(model, heads, **fields):
    """`heads` saved in a fresh folder with `fields` of its JSON replaced."""
    import json
    import tempfile
    from pathlib import Path

    from earlyexit.runtime.heads import HEADS_CONFIG

    d = Path(tempfile.mkdtemp())
    heads.save(d)
    raw = json.loads((d / HEADS_CONFIG).read_text())
    (d / HEADS_CONFIG).write_text(json.dumps({**raw, **fields}))
    return d


@pytest.mark.parametrize("case,call,fragment", api_cases(), ids=[c[0] for c in api_cases()])
def test_library_refuses_with_one_clear_error(case, call, fragment, api):
    t0 = time.perf_counter()
    with pytest.raises(EarlyExitError) as e:
        call(*api)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10


def test_the_catalogue_holds_over_sixty_cases():
    assert len(cli_cases()) + len(serve_cases()) + len(api_cases()) >= 60


def test_the_heaviest_refusals_stay_under_a_gigabyte_and_ten_seconds(tmp_path):
    """Endless standard input, a million-token draft and a prompt past the context, each its own CLI process over the
    embedded model: each refused in one line, with the peak memory of the largest under 1 GB."""
    import subprocess

    cases = [(["--mode", "lossless", "--max-draft", "1000000", "x"], None, "at most the model's context"),
             (["x " * 3000], None, "leaves room for"),
             ([], b"y" * BIG, "more than 4,194,304 bytes")]
    # each CLI process reports its own peak resident set as it exits: VmHWM, which starts afresh at exec (ru_maxrss
    # does not: a child forked from a large test process starts at the parent's size) and counts no child of its own
    peak_of_self = ("import re, runpy, sys\n"
                    "try:\n    runpy.run_module('earlyexit.generate', run_name='__main__', alter_sys=True)\n"
                    "finally:\n    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
                    "    print('peak-kib', hwm, file=sys.stderr)\n")
    for argv, stdin, fragment in cases:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", peak_of_self, *argv], input=stdin, capture_output=True, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and fragment in err, err[-500:]
        assert time.perf_counter() - t0 < 10
        peak_kib = int(err.rsplit("peak-kib ", 1)[1].split()[0])
        assert peak_kib < 1024 * 1024, (argv[:3], peak_kib, err[-800:])
