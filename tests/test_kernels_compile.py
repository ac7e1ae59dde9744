"""Compile tier: every kernel compiled for sm_80 and sm_90 (PTX and cubin), no GPU needed.

Runs in a subprocess because this test process has TRITON_INTERPRET=1 set for the
interpreter tier, and the interpreter never compiles anything.
"""

import json
import os
import subprocess
import sys


def test_every_kernel_compiles_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "earlyexit.kernels.compile_check"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    kernels = {"exit_confidence_split", "exit_confidence_split_normalised", "exit_confidence_merge", "layer_check", "state_copy"}
    assert {(r["kernel"], r["sm"], r["dtype"]) for r in report} == {(k, sm, dt) for k in kernels for sm in (80, 90) for dt in ("fp32", "fp16")}
    assert all(r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0 for r in report)


def test_compile_check_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "earlyexit.kernels.compile_check"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
