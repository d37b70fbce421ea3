"""Shared bits of the benchmarks: environment record and result writing."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str = "cpu") -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": __import__("os").cpu_count(), "device": device, "command": " ".join(sys.argv),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        env["commit"] = ""
    # a copy sent to a GPU machine names its commit in BATON_COMMIT (its .git, if any, may be stale)
    env["commit"] = __import__("os").environ.get("BATON_COMMIT") or env["commit"] or "unknown"
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write ``payload`` to ``out`` if given, else to ``results/<name>.json``."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
