"""The local code corpus, its deterministic splits, and the token windows training reads from it.

A corpus is a list of *sources*: `stdlib` (the running interpreter's standard library,
without site-packages), the name of an installed package (`torch`, `numpy`: its Python
sources, read from disk, never imported), or a path to any directory of `.py` files.
Every file gets a key `<source>/<path inside the source>`; a hash of that key puts it in
train, validation or test, so the split is the same on every machine with the same files
and a file never straddles splits. Files with identical content are kept once (the
first key in sorted order), so the test split holds no exact copy of a training file, and
a test file that is a near-duplicate of the training or validation files (most of its
distinctive lines occur there, `near_duplicate`) is dropped from the test split.

`load_eval_files` reads any other evaluation set: a directory of `.py` files, a local
JSON/JSONL/Parquet/CSV file or `datasets.save_to_disk` folder, or a `datasets` hub name.
Completion examples cut from these files live in `completion_examples` (still importable from here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sysconfig
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import EarlyExitError
from .completion_examples import CompletionExample, line_cut_examples, token_cut_examples  # noqa: F401  (importers read them here too)

SPLITS = ("train", "validation", "test")  # what read_corpus returns and train_lm caches, in this order


@dataclass
class CorpusStats:
    """What reading the sources found; recorded in model cards so a corpus is reproducible."""

    files_seen: int = 0
    kept: int = 0
    non_utf8_skipped: int = 0
    too_large_skipped: int = 0
    duplicates_skipped: int = 0
    near_duplicates_dropped: int = 0  # test files whose distinctive lines mostly occur in train/validation
    train_near_duplicates_dropped: int = 0  # near_dedup: training files mostly repeating earlier training files
    validation_near_duplicates_dropped: int = 0  # near_dedup: validation files mostly repeating training files
    bytes_kept: int = 0
    source_versions: dict[str, str] = dataclasses.field(default_factory=dict)  # what each source was when read
    per_split: dict[str, int] = dataclasses.field(default_factory=dict)
    file_list_sha256: str = ""


def resolve_source(source: str) -> Path:
    """`stdlib`, an installed package's name, or a directory -> the directory to read."""
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if os.sep not in source and "/" not in source:
        spec = importlib.util.find_spec(source)
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    raise EarlyExitError(f"corpus source {source!r} is neither 'stdlib', an installed package, nor a directory")


@lru_cache(maxsize=1)
def _distributions_of_packages() -> dict[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()  # scans every installed distribution: once per process


def source_version(source: str) -> str:
    """`python 3.11.9` for the stdlib, the installed distribution's version for a package, "" for a directory."""
    import importlib.metadata
    import platform

    if source == "stdlib":
        return f"python {platform.python_version()}"
    if Path(source).expanduser().is_dir():
        return ""
    for dist in _distributions_of_packages().get(source, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def source_name(source: str) -> str:
    return source if source == "stdlib" or "/" not in source else Path(source).name


def split_of(key: str, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the file's key (not Python's salted `hash`)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def iter_python_files(root: Path) -> Iterable[Path]:
    """`.py` files under root in sorted order, skipping installed packages and caches."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def file_list_hash(rows: list[dict]) -> str:
    """sha256 of the `path<TAB>content-sha256` lines of files in their order: which files, with which contents."""
    out = hashlib.sha256()
    for row in rows:
        digest = row.get("sha256") or hashlib.sha256(row["text"].encode("utf-8")).hexdigest()
        out.update(f"{row['path']}\t{digest}\n".encode())
    return out.hexdigest()


def read_corpus(
    sources: Sequence[str] = ("stdlib",),
    validation_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_file_bytes: int = 1_000_000,
    near_dedup: bool = False,
) -> tuple[dict[str, list[dict[str, str]]], CorpusStats]:
    """Read the sources into `{split: [{"path", "text"}, ...]}`, deduplicated by content.

    The test split always drops near-duplicates of train/validation files. `near_dedup` also
    drops training files that mostly repeat earlier training files (in path order, so the
    first copy stays) and validation files that mostly repeat training files: in the default
    model's sources that is 27% of the training bytes, two thirds of `transformers`, whose
    model files copy each other's code.
    """
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise EarlyExitError("validation_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    stats = CorpusStats()
    records: dict[str, str] = {}
    for source in sources:
        root, name = resolve_source(source), source_name(source)
        stats.source_versions[name] = source_version(source)
        for file in iter_python_files(root):
            stats.files_seen += 1
            raw = file.read_bytes()
            if len(raw) > max_file_bytes:
                stats.too_large_skipped += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.non_utf8_skipped += 1
                continue
            records[f"{name}/{file.relative_to(root).as_posix()}"] = text
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    seen_content: set[str] = set()
    for key in sorted(records):
        text = records[key]
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen_content:
            stats.duplicates_skipped += 1
            continue
        seen_content.add(digest)
        splits[split_of(key, validation_fraction, test_fraction)].append({"path": key, "text": text, "sha256": digest})
    # test against every train/validation file, near_dedup's drops included: a model continued from an earlier phase
    # trained on them, so a test file repeating one is not held out
    splits["test"], stats.near_duplicates_dropped = drop_near_duplicates(splits["test"], splits["train"] + splits["validation"])
    if near_dedup:
        splits["train"], stats.train_near_duplicates_dropped = drop_repeats(splits["train"])
        splits["validation"], stats.validation_near_duplicates_dropped = drop_near_duplicates(splits["validation"], splits["train"])
    stats.kept = sum(len(v) for v in splits.values())
    stats.per_split = {s: len(v) for s, v in splits.items()}
    stats.file_list_sha256 = file_list_hash([row for split in SPLITS for row in splits[split]])
    for split in SPLITS:
        for row in splits[split]:
            del row["sha256"]
            stats.bytes_kept += len(row["text"].encode("utf-8"))
    if stats.kept == 0:
        raise EarlyExitError(f"no readable .py files in corpus sources {list(sources)}")
    return splits, stats


def distinctive_lines(text: str, min_chars: int = 16) -> set[int]:
    """Hashes of a file's stripped lines long enough to say something about it (short ones: `else:`, `return x`)."""
    return {hash(line) for line in (raw.strip() for raw in text.splitlines()) if len(line) >= min_chars}


def drop_near_duplicates(candidates: list[dict], reference: list[dict], max_shared: float = 0.5, min_lines: int = 4) -> tuple[list[dict], int]:
    """`candidates` without the files sharing more than `max_shared` of their distinctive lines with `reference`.

    Files with fewer than `min_lines` distinctive lines are kept: too little to judge.
    """
    seen: set[int] = set()
    for row in reference:
        seen |= distinctive_lines(row["text"])
    kept = [row for row in candidates if not _mostly_seen(distinctive_lines(row["text"]), seen, max_shared, min_lines)]
    return kept, len(candidates) - len(kept)


def _mostly_seen(lines: set[int], seen: set[int], max_shared: float, min_lines: int) -> bool:
    return len(lines) >= min_lines and len(lines & seen) > max_shared * len(lines)


def drop_repeats(rows: list[dict], max_shared: float = 0.5, min_lines: int = 4) -> tuple[list[dict], int]:
    """`rows` without the files sharing more than `max_shared` of their distinctive lines with the files
    kept before them (the rule of `drop_near_duplicates`, applied within one list)."""
    seen: set[int] = set()
    kept = []
    for row in rows:
        lines = distinctive_lines(row["text"])
        if not _mostly_seen(lines, seen, max_shared, min_lines):
            seen |= lines
            kept.append(row)
    return kept, len(rows) - len(kept)


def read_configured_corpus(cfg) -> tuple[dict[str, list[dict[str, str]]], CorpusStats]:
    """The corpus a train_lm config names (an `LMTrainConfig` or its dict, e.g. a model's training_state.json
    config; one written before `near_dedup` existed reads without it, as it was trained)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default=None: getattr(cfg, key, default)
    return read_corpus(get("sources"), get("validation_fraction"), get("test_fraction"), near_dedup=bool(get("near_dedup", False)))


TEXT_COLUMNS = ("content", "code", "text", "source", "whole_func_string", "func_code_string")


def load_eval_files(spec: str, split: str = "test", limit: int | None = None) -> list[dict[str, str]]:
    """An evaluation set as [{"path", "text"}]: a directory of .py files, a local data file
    (.json, .jsonl, .parquet, .csv) or `save_to_disk` folder, or a `datasets` hub name (its `split`).

    The code column is the first of TEXT_COLUMNS the set has.
    """
    import datasets

    path = Path(spec).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if path.is_dir() and not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            rows = [{"path": f.relative_to(path).as_posix(), "text": f.read_text(encoding="utf-8", errors="replace")}
                    for f in iter_python_files(path)]
            if not rows:
                raise EarlyExitError(f"no .py files under {path}")
            return rows[:limit]
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise EarlyExitError(f"{path} has splits {sorted(ds)}, not {split!r}")
                ds = ds[split]
        elif path.suffix in builders and path.is_file():
            ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        elif path.suffix in builders:
            raise EarlyExitError(f"no such data file: {path}")
        else:
            ds = datasets.load_dataset(spec, split=split)
    except EarlyExitError:
        raise
    except Exception as e:  # a hub name offline, a corrupt file: one line that names the set
        raise EarlyExitError(f"cannot load evaluation data {spec!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    column = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if column is None:
        raise EarlyExitError(f"evaluation data {spec!r} has no code column (looked for {', '.join(TEXT_COLUMNS)}; it has {ds.column_names})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    names = ds["path"] if "path" in ds.column_names else [f"{spec}#{i}" for i in range(len(ds))]
    return [{"path": str(n), "text": t} for n, t in zip(names, ds[column]) if isinstance(t, str) and t]


def load_corpus(sources: Sequence[str] = ("stdlib",), **kwargs):
    """The corpus as a `datasets.DatasetDict` with train/validation/test of (path, text)."""
    import datasets

    splits, stats = read_corpus(sources, **kwargs)
    features = datasets.Features({"path": datasets.Value("string"), "text": datasets.Value("string")})
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows, features=features) for s, rows in splits.items()}
    )
    return dd, stats


@lru_cache(maxsize=4)
def _window_order(n_windows: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).permutation(n_windows)


def corpus_drift(recorded: dict, stats: CorpusStats) -> str | None:
    """Why the corpus read here is not the one a model recorded (its training_state's corpus stats), with the pins
    that would bring it back; None when the file lists match or nothing was recorded to compare."""
    before = recorded.get("file_list_sha256")
    if not before or before == stats.file_list_sha256:
        return None
    then, now = recorded.get("source_versions", {}), stats.source_versions
    changed = sorted(s for s in then if then[s] != now.get(s))
    pins = [f"{dist}=={then[s]}" for s in changed if not then[s].startswith("python ")
            for dist in _distributions_of_packages().get(s, [])[:1]]
    if not changed:
        return ("the corpus files on this machine differ from those the model recorded (same source versions, or none "
                "recorded): held-out figures may include files it trained on")
    versions = ", ".join(f"{s} {now.get(s) or 'missing'} here, {then[s]} then" for s in changed)
    return (f"the corpus files on this machine differ from those the model recorded ({versions}): held-out figures may "
            "include files it trained on" + (f"; pip install {' '.join(pins)} reads the recorded corpus" if pins else ""))


def trained_corpus(state: dict):
    """The corpus a model's training_state.json names, read here; a warning when its files differ from those the
    model recorded."""
    import sys

    splits, stats = read_configured_corpus(state["config"])
    drift = corpus_drift(state.get("corpus", {}).get("stats", {}), stats)
    if drift:
        print(f"warning: {drift}", file=sys.stderr)
    return splits, stats


def model_corpus(model_dir: str | Path, sources: Sequence[str] | None = None):
    """The corpus splits a model was trained beside (its training_state.json, see `trained_corpus`), else
    `sources`, else the stdlib."""
    import json

    state_file = Path(model_dir) / "training_state.json"
    if sources is None and state_file.is_file():
        return trained_corpus(json.loads(state_file.read_text()))
    return read_corpus(list(sources or ["stdlib"]))


def window_batch(tokens, seq_len: int, first: int, count: int, seed: int):
    """Windows first..first+count-1 of seq_len+1 tokens, in a seeded order that reshuffles every epoch.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    Returns an int64 tensor (count, seq_len + 1).
    """
    import numpy as np
    import torch

    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise EarlyExitError(f"{len(tokens)} tokens are too few for one window of {seq_len + 1}")
    rows = []
    for i in range(first, first + count):
        epoch, j = divmod(i, n_windows)
        start = int(_window_order(n_windows, seed + epoch)[j]) * seq_len
        rows.append(np.asarray(tokens[start:start + seq_len + 1], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))
