"""A run's prepared corpus, packed here and unpacked elsewhere, trains there without the sources it was read from."""

import shutil

import numpy as np
import pytest

from earlyexit.data.pack import main as pack_main
from earlyexit.data.pack import pack, unpack
from earlyexit.errors import EarlyExitError
from earlyexit.training.train_lm import main as train_main

from test_train_lm import make_corpus, tiny_recipe


def test_a_packed_corpus_trains_elsewhere_on_the_same_tokens(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    assert train_main(["--prepare-only", *tiny_recipe(tmp_path, corpus, max_steps=1)]) == 0
    assert "prepared" in capsys.readouterr().out and not (tmp_path / "run/checkpoint.pt").exists()  # no step taken
    assert pack_main(["pack", str(tmp_path / "run"), str(tmp_path / "carry/corpus.tar.xz")]) == 0
    shutil.rmtree(corpus)  # the other machine has no such sources: the run must not need them
    there = tmp_path / "there"
    assert pack_main(["unpack", str(tmp_path / "carry/corpus.tar.xz"), str(there)]) == 0
    assert "each matching the manifest" in capsys.readouterr().out
    for split in ("train", "validation", "test"):
        assert np.array_equal(np.load(there / f"tokens_{split}.npy"), np.load(tmp_path / f"run/tokens_{split}.npy"))
    assert train_main(tiny_recipe(tmp_path, corpus, max_steps=2, work_dir=there, out_dir=there / "export")) == 0
    assert (there / "export/model.safetensors").is_file()


def test_a_missing_corrupt_or_incomplete_pack_is_one_line(tmp_path, capsys):
    with pytest.raises(EarlyExitError, match="no corpus pack"):
        unpack(tmp_path / "absent.tar.xz", tmp_path / "w")
    (tmp_path / "junk.tar.xz").write_bytes(b"not xz at all")
    assert pack_main(["unpack", str(tmp_path / "junk.tar.xz"), str(tmp_path / "w")]) == 2
    assert "not a readable corpus pack" in capsys.readouterr().err
    with pytest.raises(EarlyExitError, match="run train_lm there first"):
        pack(tmp_path, tmp_path / "out.tar.xz")  # a directory train_lm never prepared


def test_a_file_that_does_not_match_the_manifest_is_named(tmp_path):
    import io
    import json
    import tarfile

    corpus = make_corpus(tmp_path)
    assert train_main(tiny_recipe(tmp_path, corpus, max_steps=1)) == 0
    manifest = pack(tmp_path / "run", tmp_path / "p.tar.xz")
    # the same files under a manifest that records another train split: what a damaged transfer looks like
    manifest["tokens_train.npy"] = "0" * 64
    body = json.dumps(manifest).encode()
    with tarfile.open(tmp_path / "p.tar.xz", "r:xz") as src, tarfile.open(tmp_path / "bad.tar.xz", "w:xz") as dst:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        dst.addfile(info, io.BytesIO(body))
        for member in src.getmembers():
            if member.name != "manifest.json":
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(EarlyExitError, match="tokens_train.npy do not match the manifest"):
        unpack(tmp_path / "bad.tar.xz", tmp_path / "there")


def test_train_on_device_script_trains_from_a_pack_and_hands_back_the_export_in_parts(tmp_path):
    """experiments/train_on_device.sh end to end, on the CPU with a tiny model: what one device call would do."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    corpus = make_corpus(tmp_path)
    assert train_main(tiny_recipe(tmp_path, corpus, max_steps=1)) == 0
    pack(tmp_path / "run", tmp_path / "carry/corpus.tar.xz")
    out, work = tmp_path / "out", tmp_path / "gpu_run"
    out.mkdir()
    script = Path(__file__).resolve().parents[1] / "experiments/train_on_device.sh"
    tiny = ["device=cpu", "compile=false", "threads=1", "vocab_size=300", "n_layer=2", "n_embd=32", "n_head=2",
            "n_positions=32", "seq_len=32", "batch_size=2", "warmup_steps=1", "decay_steps=4", "max_steps=12",
            "eval_interval=4", "checkpoint_interval=4"]
    env = {**os.environ, "OUT": str(out), "WORK_DIR": str(work), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), str(tmp_path / "carry/corpus.tar.xz"), "0.5", *tiny], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "budget_minutes=0.5" in log and "val_loss" in log and "train_lm: " not in log
    parts = sorted(out.glob("export.tar.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar x -C {back}", shell=True, check=True)
    assert AutoModelForCausalLM.from_pretrained(back / "export").config.n_layer == 2 and (back / "log.jsonl").is_file()
