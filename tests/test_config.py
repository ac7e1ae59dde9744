from dataclasses import dataclass, field

import pytest

from earlyexit.config import load_config
from earlyexit.errors import EarlyExitError


@dataclass
class Demo:
    lr: float = 1e-3
    steps: int = 10
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    compile: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2.0e-3\nsteps: 5\n")
    cfg = load_config(Demo, path, ["steps=7", "lr=3e-4", "sources=[a, b]", "compile=true"])
    assert cfg == Demo(lr=3e-4, steps=7, sources=["a", "b"], compile=True)


def test_unknown_keys_missing_files_and_malformed_overrides_are_refused(tmp_path):
    with pytest.raises(EarlyExitError, match="unknown Demo field"):
        load_config(Demo, None, ["stpes=3"])
    with pytest.raises(EarlyExitError, match="not found"):
        load_config(Demo, tmp_path / "missing.yaml")
    with pytest.raises(EarlyExitError, match="key=value"):
        load_config(Demo, None, ["steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(EarlyExitError, match="not valid YAML"):
        load_config(Demo, bad)
