"""The corpus: deterministic splits, skipped files counted, reproducible examples."""

import pytest

from earlyexit.data.corpus import line_cut_examples, load_corpus, read_corpus, split_of, token_cut_examples
from earlyexit.errors import EarlyExitError


@pytest.fixture
def corpus_dir(tmp_path):
    for i in range(40):
        (tmp_path / f"mod_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nprint(f{i}(3))\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "copy.py").write_text((tmp_path / "mod_0.py").read_text())  # exact duplicate
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    (tmp_path / "notes.txt").write_text("not python")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "cached.py").write_text("x = 1\n")
    return tmp_path


def test_splits_are_deterministic_and_skips_are_counted(corpus_dir):
    a, stats = read_corpus([str(corpus_dir)], validation_fraction=0.2, test_fraction=0.2)
    b, _ = read_corpus([str(corpus_dir)], validation_fraction=0.2, test_fraction=0.2)
    assert a == b
    assert stats.non_utf8_skipped == 1 and stats.duplicates_skipped == 1
    assert stats.files_seen == 42 and stats.kept == 40  # pycache and .txt never read
    paths = [r["path"] for split in a.values() for r in split]
    assert len(paths) == len(set(paths))
    assert all(split_of(r["path"], 0.2, 0.2) == s for s, rows in a.items() for r in rows)
    assert all(len(rows) > 0 for rows in a.values())
    assert stats.source_versions == {corpus_dir.name: ""}  # a directory has no version to record


def test_sources_record_the_version_they_were_read_at():
    import platform

    import numpy

    from earlyexit.data.corpus import source_version

    assert source_version("stdlib") == f"python {platform.python_version()}"
    assert source_version("numpy") == numpy.__version__


def test_a_corpus_that_drifted_from_the_recorded_one_is_named_with_the_pins_that_restore_it(corpus_dir, tmp_path, capsys):
    import dataclasses
    import json

    import numpy

    from earlyexit.data.corpus import corpus_drift, model_corpus

    _, stats = read_corpus([str(corpus_dir)], validation_fraction=0.2, test_fraction=0.2)
    recorded = dataclasses.asdict(stats)
    assert corpus_drift(recorded, stats) is None and corpus_drift({}, stats) is None  # same files, or nothing to compare
    older = {**recorded, "file_list_sha256": "0" * 64, "source_versions": {"numpy": "1.0.0", "stdlib": "python 3.9.0"}}
    now = dataclasses.replace(stats, source_versions={"numpy": numpy.__version__, "stdlib": "python 3.11.7"})
    message = corpus_drift(older, now)
    assert f"numpy {numpy.__version__} here, 1.0.0 then" in message and "stdlib python 3.11.7 here, python 3.9.0 then" in message
    assert message.endswith("pip install numpy==1.0.0 reads the recorded corpus")  # the interpreter is no pip pin
    assert "same source versions" in corpus_drift({**recorded, "file_list_sha256": "0" * 64}, stats)
    # an evaluation reading a model's test split says so, and still returns the split it read
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = {"sources": [str(corpus_dir)], "validation_fraction": 0.2, "test_fraction": 0.2}
    (model_dir / "training_state.json").write_text(json.dumps({"config": config, "corpus": {"stats": {**recorded, "file_list_sha256": "f" * 64}}}))
    splits, _ = model_corpus(model_dir)
    assert splits["test"] and "warning: the corpus files on this machine differ" in capsys.readouterr().err
    (model_dir / "training_state.json").write_text(json.dumps({"config": config, "corpus": {"stats": recorded}}))
    model_corpus(model_dir)
    assert capsys.readouterr().err == ""


def test_load_corpus_gives_a_datasetdict(corpus_dir):
    dd, stats = load_corpus([str(corpus_dir)], validation_fraction=0.2, test_fraction=0.2)
    assert set(dd) == {"train", "validation", "test"}
    assert sum(len(d) for d in dd.values()) == stats.kept
    assert dd["train"].column_names == ["path", "text"]


def test_unknown_source_and_empty_directory_are_refused(tmp_path):
    with pytest.raises(EarlyExitError, match="neither"):
        read_corpus(["no_such_package_or_dir_xyz"])
    with pytest.raises(EarlyExitError, match="no readable"):
        read_corpus([str(tmp_path)])


def test_examples_are_seeded_and_cut_where_promised(corpus_dir, tiny_tokenizer):
    splits, _ = read_corpus([str(corpus_dir)], validation_fraction=0.2, test_fraction=0.2)
    files = splits["train"]
    tok_a = token_cut_examples(files, tiny_tokenizer, n=5, target_tokens=4, seed=1)
    assert tok_a == token_cut_examples(files, tiny_tokenizer, n=5, target_tokens=4, seed=1)
    assert tok_a != token_cut_examples(files, tiny_tokenizer, n=5, target_tokens=4, seed=2)
    texts = {r["path"]: r["text"] for r in files}
    for ex in tok_a:
        assert (ex.prompt + ex.target) in texts[ex.path]
        assert len(tiny_tokenizer.encode(ex.target)) <= 4 + 1
    lines = line_cut_examples(files, n=20, seed=3)
    assert lines == line_cut_examples(files, n=20, seed=3)
    for ex in lines:
        assert "\n" not in ex.target and len(ex.target) >= 3
        assert texts[ex.path].startswith(ex.prompt)
        assert texts[ex.path][len(ex.prompt):].split("\n")[0] == ex.target
    # a prompt limit changes only how much text comes before each cut: the cuts and targets stay (the model card
    # scores the same lines with its prompts and with the whole file above them)
    short = line_cut_examples(files, n=20, seed=3, max_prompt_chars=10)
    assert [(e.path, e.target) for e in short] == [(e.path, e.target) for e in lines]
    assert all(len(s.prompt) <= 10 and e.prompt.endswith(s.prompt) for s, e in zip(short, lines))


def test_near_duplicate_test_files_are_dropped():
    from earlyexit.data.corpus import drop_near_duplicates

    body = "".join(f"    value_{i} = compute_something({i}, other_argument)\n" for i in range(10))
    train = [{"path": "a.py", "text": "def f():\n" + body}]
    copy = {"path": "copy.py", "text": "def g():\n" + body + "    return value_9 + another_long_name\n"}
    fresh = {"path": "fresh.py", "text": "".join(f"unrelated_name_{i} = something_else({i})\n" for i in range(10))}
    tiny = {"path": "tiny.py", "text": body.splitlines()[0]}  # too few lines to judge: kept
    kept, dropped = drop_near_duplicates([copy, fresh, tiny], train)
    assert [r["path"] for r in kept] == ["fresh.py", "tiny.py"] and dropped == 1


def test_eval_files_from_a_directory_and_local_data_files(tmp_path):
    import json

    from earlyexit.data.corpus import load_eval_files

    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.py").write_text("x = 1\n")
    assert load_eval_files(str(tmp_path / "src")) == [{"path": "a.py", "text": "x = 1\n"}]
    rows = [{"path": "p.py", "content": "print(1)\n"}, {"path": "q.py", "content": "y = 2\n"}]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_eval_files(str(tmp_path / "code.jsonl")) == [{"path": r["path"], "text": r["content"]} for r in rows]
    assert len(load_eval_files(str(tmp_path / "code.jsonl"), limit=1)) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"stars": 3}) + "\n")
    with pytest.raises(EarlyExitError, match="no code column"):
        load_eval_files(str(tmp_path / "bad.jsonl"))
    with pytest.raises(EarlyExitError, match="no such data file"):
        load_eval_files(str(tmp_path / "missing.parquet"))


def test_eval_files_from_a_saved_datasetdict(tmp_path):
    import datasets

    from earlyexit.data.corpus import load_eval_files

    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"code": "a = 1\n"}])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_eval_files(str(tmp_path / "saved")) == [{"path": f"{tmp_path / 'saved'}#0", "text": "a = 1\n"}]
    with pytest.raises(EarlyExitError, match="not 'validation'"):
        load_eval_files(str(tmp_path / "saved"), split="validation")


def test_near_dedup_drops_copies_within_training_and_validation_copies_of_training(tmp_path):
    from earlyexit.data.corpus import read_configured_corpus

    body = "".join(f"def function_number_{i}(argument):\n    return argument * {i} + {i}\n\n" for i in range(12))
    for i in range(40):
        # every file shares `body`; each has only a few lines of its own, so each mostly repeats the others
        (tmp_path / f"m{i}.py").write_text(body + f"UNIQUE_CONSTANT_{i} = 'distinct value {i}'\n")
    (tmp_path / "own.py").write_text("".join(f"def only_here_{i}(argument):\n    return argument - {i}\n" for i in range(8)))
    plain, plain_stats = read_corpus([str(tmp_path)], 0.2, 0.2)
    deduped, stats = read_corpus([str(tmp_path)], 0.2, 0.2, near_dedup=True)
    assert plain_stats.train_near_duplicates_dropped == 0 and len(plain["train"]) > 10
    # one copy of the shared body stays in training (the first in path order), plus the file of its own
    assert stats.train_near_duplicates_dropped == len(plain["train"]) - len(deduped["train"]) > 10
    assert all(r in plain["train"] for r in deduped["train"]) and plain["train"][0] in deduped["train"]
    assert deduped["validation"] == [r for r in plain["validation"] if "own.py" in r["path"]]
    assert stats.validation_near_duplicates_dropped == len(plain["validation"]) - len(deduped["validation"])
    assert read_configured_corpus({"sources": [str(tmp_path)], "validation_fraction": 0.2, "test_fraction": 0.2})[0] == plain
    assert read_configured_corpus({"sources": [str(tmp_path)], "validation_fraction": 0.2, "test_fraction": 0.2, "near_dedup": True})[0] == deduped


def test_test_split_drops_near_copies_of_training_files_that_near_dedup_dropped(tmp_path):
    """A training file near_dedup drops still belongs to the training side (an earlier phase may have trained on it):
    a test file repeating it is no held-out file, with or without near_dedup."""
    def named(split: str, prefix: str) -> str:
        return next(f"{prefix}{i}.py" for i in range(1000) if split_of(f"{tmp_path.name}/{prefix}{i}.py", 0.2, 0.2) == split)

    def lines(tag: str, n: int) -> str:
        return "".join(f"value_{tag}_{i} = compute_something_long({i})\n" for i in range(n))

    first, second, held_out = named("train", "a"), named("train", "b"), named("test", "t")
    (tmp_path / first).write_text(lines("first", 10))
    (tmp_path / second).write_text(lines("first", 10) + lines("second", 8))  # 10 of its 18 lines repeat `first`
    (tmp_path / held_out).write_text(lines("second", 8) + lines("first", 4) + lines("test", 4))  # mostly `second`'s
    for near_dedup in (False, True):
        splits, stats = read_corpus([str(tmp_path)], 0.2, 0.2, near_dedup=near_dedup)
        assert splits["test"] == [] and stats.near_duplicates_dropped == 1
    assert [r["path"].split("/")[-1] for r in splits["train"]] == [first]  # near_dedup did drop `second`
