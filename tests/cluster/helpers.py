"""Helpers the cluster tests share: polling for a condition, a controller's workers."""

from __future__ import annotations

import time
from typing import Callable

import ray


def wait_until(pred: Callable[[], object], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Call ``pred`` every ``every`` seconds until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def controller_workers(ctl) -> dict[str, dict]:
    """The controller actor's workers by id (``state()["workers"]``)."""
    return {w["worker_id"]: w for w in ray.get(ctl.state.remote())["workers"]}
