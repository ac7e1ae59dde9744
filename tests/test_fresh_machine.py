"""What a new user's machine does with the checkout: names on sys.path, the package's public names, safe loading.

Run from the repository root (`python -m ...`, `python -m pytest`, any subprocess started there), the root is the
first entry of sys.path. A regular package at the root named like a dependency shadows that dependency: the repo's
old `kernels/__init__.py` broke every GPT-2 import once transformers 5.25 began importing the PyPI package `kernels`.
"""

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_gpt2_imports_from_the_root_and_kernels_is_not_the_checkouts():
    proc = run_at_root(
        "import importlib.util, sys\n"
        "import transformers.models.gpt2.modeling_gpt2\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(repr(spec.origin if spec else None))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    # None: nothing, or only a namespace portion (no regular package) named `kernels`; else the PyPI package
    assert origin is None or not Path(origin).resolve().is_relative_to(ROOT), f"`kernels` resolves to the checkout: {origin}"


def test_no_top_level_package_of_the_checkout_but_earlyexit():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["earlyexit"], f"regular packages at the root shadow installed ones of their name: {packages}"


def test_the_kernels_are_the_subpackage_earlyexit_kernels_from_the_root():
    proc = run_at_root("import earlyexit.kernels.dispatch as K, earlyexit.kernels.exit_confidence; print(K.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve() == ROOT / "kernels" / "dispatch.py"


def test_importing_the_cli_module_leaves_the_library_function_callable():
    import earlyexit.cli  # noqa: F401  (the CLI)
    import earlyexit.generate  # noqa: F401  (`python -m earlyexit.generate`: sets the package attribute `generate`)

    assert callable(earlyexit.complete) and callable(earlyexit.complete_batch)
    assert earlyexit.complete.__module__ == "earlyexit.runtime.decoding"
    assert set(earlyexit.__all__) <= set(dir(earlyexit)) and "generate" not in earlyexit.__all__


def test_no_torch_load_can_unpickle_code():
    calls = []
    for path in [*ROOT.glob("earlyexit/**/*.py"), *ROOT.glob("experiments/*.py"), *ROOT.glob("kernels/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not calls, f"torch.load without weights_only=True: {calls}"


def test_the_lower_bounds_are_the_releases_ci_tests_as_oldest():
    import re

    import pytest

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d).groups() for d in deps)
    pins = dict(line.split("==") for line in (ROOT / ".ci/oldest.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    bounds.pop("torch")  # one build on this machine's disk: CI installs exactly it first, both passes
    assert pins == bounds
