"""Where a result came from: the commit and the machine, stamped on every model card and experiment result."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# the widest matrix unit a CPU offers, best first: bf16 training and int8 decoding speeds hinge on it, so timings
# from two machines that differ here do not compare
MATRIX_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and widest matrix unit (from /proc/cpuinfo), else the architecture."""
    arch = platform.machine() or platform.processor() or "unknown"
    try:
        info = cpuinfo.read_text()
    except OSError:
        return arch
    fields: dict[str, str] = {}
    for line in info.splitlines():  # every CPU repeats the fields; the first one's are kept
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = " ".join(fields.get("model name", "").split())
    flags = set(fields.get("flags", "").split())
    unit = next((label for flag, label in MATRIX_UNITS if flag in flags), "")
    if not name:
        return f"{arch} ({unit})" if unit else arch
    return f"{name} ({arch}{', ' + unit if unit else ''})"


def machine() -> str:
    return f"{cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"
