from dataclasses import dataclass, field
from pathlib import Path

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


def test_a_config_starts_from_its_parent_and_overrides_it(tmp_path):
    from earlyexit.config import read_yaml

    (tmp_path / "base.yaml").write_text("a: 1\nb: [x, y]\nc: keep\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("parent: ../base.yaml\nb: [z]\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("parent: mid.yaml\na: 2\n")
    assert read_yaml(tmp_path / "sub" / "leaf.yaml") == {"a": 2, "b": ["z"], "c": "keep"}


@pytest.mark.parametrize("files,message", [
    ({"a.yaml": "parent: b.yaml\n", "b.yaml": "parent: a.yaml\n"}, "parent chain loops"),
    ({"a.yaml": "parent: a.yaml\nx: 1\n"}, "parent chain loops"),
    ({"a.yaml": "parent: missing.yaml\n"}, "the parent of"),
    ({"a.yaml": "parent: 3\n"}, "parent must be the path of another config file"),
    ({"a.yaml": "parent: b.yaml\n", "b.yaml": "- 1\n- 2\n"}, "must hold a mapping"),
])
def test_a_bad_parent_chain_is_one_clear_error(tmp_path, files, message):
    from earlyexit.config import read_yaml

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(EarlyExitError, match=message):
        read_yaml(tmp_path / "a.yaml")


def test_every_lm_phase_holds_only_what_differs_from_the_phase_it_names():
    import yaml

    from earlyexit.config import read_yaml

    configs = Path(__file__).resolve().parents[1] / "configs" / "default_lm"
    phases = sorted(p for p in configs.glob("*.yaml") if p.name != "base.yaml")
    assert len(phases) >= 10
    for path in phases:
        own = yaml.safe_load(path.read_text())
        assert "parent" in own, f"{path.name} names no parent"
        parent = read_yaml(configs / own.pop("parent"))
        same = sorted(k for k, v in own.items() if k in parent and parent[k] == v)
        assert not same, f"{path.name} repeats its parent's {same}"
