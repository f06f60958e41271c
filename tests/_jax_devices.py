"""Run a JAX test script in a subprocess that sees several CPU host devices.

``XLA_FLAGS=--xla_force_host_platform_device_count`` must be set before JAX starts, so the script
runs in its own interpreter and the flag does not leak into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_on_host_devices(script: str, devices: int = 4, *, fast_compile: bool = False) -> str:
    """Run ``script`` with ``devices`` CPU devices, assert it succeeds and return its stdout.

    ``fast_compile`` lowers the LLVM optimisation level, which halves compile time; use it only
    when every run being compared uses it.
    """
    env = dict(os.environ)
    flags = f" --xla_force_host_platform_device_count={devices}"
    if fast_compile:
        flags += " --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
