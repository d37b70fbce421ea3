"""What the Triton kernel tests share: whether Triton imports, the skip for a
machine without CUDA, and running a test module under the Triton interpreter
(the interpreter is chosen when ``triton`` is imported, so it needs a fresh
process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:
    HAVE_TRITON = False

needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON),
                                       reason="needs a CUDA GPU and triton")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not importable")


def run_under_interpreter(path: str, timeout: float, args: list[str] = ()) -> str:
    """Run the module at ``path`` as a script (with ``args``) with TRITON_INTERPRET=1; its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, path, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout
