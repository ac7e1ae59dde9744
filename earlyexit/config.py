"""Dataclass configs loaded from `configs/*.yaml`, overridable from the command line.

One source of defaults: the dataclass. A YAML file sets some fields; `key=value`
overrides from the command line set others (values parsed as YAML, so `lr=3e-4`,
`sources=[stdlib,torch]` and `compile=false` all do what they look like). Unknown keys
are refused, so a typo never silently falls back to a default. A file may name a `parent:` file whose values
it starts from, so a phase of a recipe holds only what it changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence, TypeVar

import yaml

from .errors import EarlyExitError

T = TypeVar("T")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["lr=3e-4", "compile=false"]` -> `{"lr": 0.0003, "compile": False}`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise EarlyExitError(f"override {pair!r} is not of the form key=value")
        value = yaml.safe_load(raw) if raw else ""
        # YAML reads 3e-4 as a string (no dot); numbers in scientific notation are floats here.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        out[key.strip()] = value
    return out


MAX_PARENTS = 32  # a chain of phases deeper than this is a cycle, or a mistake


def read_yaml(path: str | os.PathLike, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The mapping a config file holds, its `parent:` chain resolved: the parent's values (a path relative to this
    file), then this file's over them. A phase of a recipe holds only what differs from the phase it continues."""
    if not os.path.isfile(path):
        raise EarlyExitError(f"config file not found: {path}" + (f" (the parent of {seen[-1]})" if seen else ""))
    real = os.path.realpath(path)
    if real in seen or len(seen) >= MAX_PARENTS:
        raise EarlyExitError(f"config file {path}: its parent chain loops or is deeper than {MAX_PARENTS} ({' -> '.join(seen)})")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EarlyExitError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise EarlyExitError(f"config file {path} must hold a mapping of field: value")
    parent = loaded.pop("parent", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str) or not parent:
        raise EarlyExitError(f"config file {path}: parent must be the path of another config file, got {parent!r}")
    base = read_yaml(os.path.join(os.path.dirname(path), parent), (*seen, real))
    return {**base, **loaded}


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path` (its `parent:` chain first), then `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml(path))
    values.update(parse_overrides(overrides))
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise EarlyExitError(f"unknown {cls.__name__} field(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    try:
        return cls(**values)
    except TypeError as e:
        raise EarlyExitError(f"bad {cls.__name__}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict, for JSON stamps and checkpoints."""
    return dataclasses.asdict(config)


def config_parser(description: str, cls: type) -> argparse.ArgumentParser:
    """An argparse parser with the `--config FILE` and `key=value` overrides every script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help=f"YAML file with {cls.__name__} fields")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides of {cls.__name__} fields")
    return parser


def exit_code(run: Callable[[], object]) -> int:
    """Run a script body: 0 on success; an EarlyExitError is one `error:` line on stderr and 2."""
    try:
        run()
    except EarlyExitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
