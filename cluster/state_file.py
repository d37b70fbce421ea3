"""The state file `baton up` writes so the other `baton` commands find the cluster.

``$BATON_STATE_DIR`` (or ``~/.cache/baton``) ``/cluster.json``: pid, Ray address,
namespace, store URL, router URL. Written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_path() -> Path:
    base = os.environ.get("BATON_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "baton")
    return Path(base) / "cluster.json"


def read_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str | Path, data) -> None:
    """``data`` as indented JSON at ``path``, replaced in one step (readers never see half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(p)


def write_state(data: dict) -> None:
    write_json_atomic(state_path(), data)


def drop_state() -> None:
    """Remove the state file if this process wrote it."""
    st = read_state()
    if st and st.get("pid") == os.getpid():
        state_path().unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
