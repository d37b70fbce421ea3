"""Exceptions the worker client raises (gRPC status → Python)."""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A worker call failed (any status but INVALID_ARGUMENT). ``code`` is the
    gRPC status name (e.g. "DATA_LOSS", "UNAVAILABLE")."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


class WorkerBusy(WorkerError):
    """RESOURCE_EXHAUSTED: the worker's queue or KV pool is full; try another worker or later."""

    def __init__(self, message: str, code: str = "RESOURCE_EXHAUSTED"):
        super().__init__(message, code)
