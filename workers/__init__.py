"""Baton workers: an engine (prefill, decode or colocated) behind a gRPC server.

``workers.host.WorkerHost`` is the worker (runs in process); ``workers.actors``
wraps it as Ray actors (``PrefillWorker``, ``DecodeWorker``,
``ColocatedWorker``); ``workers.client.WorkerClient`` is the async client.
Imports are lazy so the router can import the client without torch or Ray.
"""

__all__ = ["WorkerClient", "WorkerBusy", "WorkerError", "DecodeChunk", "WorkerStats", "WorkerHost",
           "PrefillWorker", "DecodeWorker", "ColocatedWorker"]

_LAZY = {"WorkerClient": "workers.client", "WorkerBusy": "workers.errors", "WorkerError": "workers.errors",
         "DecodeChunk": "workers.types", "WorkerStats": "workers.types", "WorkerHost": "workers.host",
         "PrefillWorker": "workers.actors", "DecodeWorker": "workers.actors", "ColocatedWorker": "workers.actors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
