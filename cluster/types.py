"""Plain data shared by the controller, the worker actors, the launcher and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker actor needs to start; its only constructor argument."""
    worker_id: str
    role: str                           # prefill | decode | colocated
    engine: Any                         # engine.config.EngineConfig (mode set by role)
    store_url: str                      # registry + prefix index (cluster.store.connect)
    namespace: str = "baton"
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    host: str = "127.0.0.1"             # interface the gRPC server binds; 0.0.0.0: advertise the node IP
    tp: int = 1                         # TP ranks (== engine.tensor_parallel_size)
    metrics: bool = True                # serve /metrics on a free port
    placement_group: Any = None         # the worker's Ray placement group (bundle r: TP rank r; r=0 is this actor)
    kv_transport: str = "grpc"          # grpc | nccl (workers.host.WorkerHost)


@dataclass
class WorkerState:
    """One worker as the controller reports it (``state()["workers"]``)."""
    worker_id: str
    role: str
    status: str                         # starting | ready | draining | dead | stopped
    address: str = ""
    restarts: int = 0
    started_at: float = 0.0
    stats: dict = field(default_factory=dict)
    error: str = ""
    tp: int = 1                         # TP ranks of this worker
    placement_group: str = ""           # its Ray placement group id (hex), while it has one


def as_dict(stats: Any) -> dict:
    """A stats object (dataclass, dict or plain object) → its scalar fields."""
    if stats is None:
        return {}
    if isinstance(stats, dict):
        out = dict(stats)
    elif dataclasses.is_dataclass(stats):
        out = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    else:
        out = dict(vars(stats))
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool, type(None)))}
