"""The package's layout rule: stages in data-flow order, and no stage imports a later one (nor the front ends).

    core (errors, config, provenance) -> kernels -> data -> runtime -> training -> evaluation -> export -> front ends (CLI, server)

Every import counts, at module level or inside a function, relative or absolute.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "earlyexit"
STAGES = ["core", "kernels", "data", "runtime", "training", "evaluation", "export", "front"]
CORE = {"errors", "config", "provenance"}
FRONT = {"cli", "generate", "__main__", "__init__", "serve", "server"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # not resolved: kernels/ is reached by a link
    return ".".join(parts)


def stage_of(module: str) -> str:
    parts = module.split(".")[1:] or ["__init__"]
    head = parts[0]
    if head in CORE:
        return "core"
    if head in FRONT:
        return "front"
    assert head in STAGES, f"{module} is in no stage: add it to one of {STAGES}"
    return head


def imports_of(path: Path) -> set[str]:
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("earlyexit"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("earlyexit")}
    return found


def package_files():
    # earlyexit/kernels links to the repository's kernels/ folder, which rglob does not enter: listed by hand
    return sorted([*PACKAGE.rglob("*.py"), *(PACKAGE / "kernels").glob("*.py")])


def test_no_stage_imports_a_later_one():
    order = {s: i for i, s in enumerate(STAGES)}
    wrong = []
    for path in package_files():
        me = module_name(path)
        for target in imports_of(path):
            if target == "earlyexit":
                continue
            if order[stage_of(target)] > order[stage_of(me)]:
                wrong.append(f"{me} ({stage_of(me)}) imports {target} ({stage_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_every_stage_is_a_package_and_the_root_holds_only_core_and_front_ends():
    for stage in STAGES[2:-1]:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose <= CORE | FRONT, f"modules outside a stage: {sorted(loose - CORE - FRONT)}"


def test_the_rule_sees_relative_and_function_level_imports_and_the_kernels():
    found = imports_of(PACKAGE / "training" / "train_lm.py")
    assert "earlyexit.data.corpus" in imports_of(PACKAGE / "training" / "lm_data.py")  # `from ..data.corpus import SPLITS`, at module level
    assert "earlyexit.training.exit_loss" in found  # `from .exit_loss import ...`, inside functions
    assert "earlyexit.kernels.dispatch" in imports_of(PACKAGE / "runtime" / "policies.py")
    assert any(p.parent.name == "kernels" for p in package_files()), "the kernels (a linked folder) are not checked"


def test_the_code_is_ruff_clean():
    """pyproject.toml's [tool.ruff] (pyflakes, pycodestyle errors and warnings, 150 columns) over the whole repository."""
    import subprocess
    import sys

    pytest.importorskip("ruff", reason="ruff is in the [dev] extra")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_over_400_lines_and_no_function_over_60():
    """Small files with one job each; a function longer than a screen is split into named phases."""
    import ast

    root = PACKAGE.parent
    files = [p for d in ("earlyexit", "kernels", "experiments") for p in (root / d).rglob("*.py")]
    assert len(files) > 50
    long_modules, long_functions = [], []
    for path in files:
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
