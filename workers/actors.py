"""Ray actors: thin wrappers around WorkerHost (all logic lives there).

``PrefillWorker.remote(engine_config, worker_id=..., ...)`` then
``ray.get(actor.start.remote())`` → address. Fractional CPUs by default
(``.options(num_cpus=..., num_gpus=...)`` to change); async actors, so the
grpc.aio server shares the actor's event loop.
"""

from __future__ import annotations

import ray

from workers.host import ColocatedWorkerHost, DecodeWorkerHost, PrefillWorkerHost, WorkerHost

_DEFAULTS = dict(num_cpus=0.25, max_restarts=0)


class _RayHost(WorkerHost):
    def __init__(self, engine_config, role: str = "colocated", **kwargs):
        kwargs.setdefault("host", "0.0.0.0")
        kwargs.setdefault("advertise_host", ray.util.get_node_ip_address())
        super().__init__(engine_config, role, **kwargs)

    async def ping(self) -> str:
        return self.worker_id


class _RayPrefill(_RayHost):
    def __init__(self, engine_config, **kwargs):
        super().__init__(engine_config, "prefill", **kwargs)


class _RayDecode(_RayHost):
    def __init__(self, engine_config, **kwargs):
        super().__init__(engine_config, "decode", **kwargs)


class _RayColocated(_RayHost):
    def __init__(self, engine_config, **kwargs):
        super().__init__(engine_config, "colocated", **kwargs)


WorkerActor = ray.remote(**_DEFAULTS)(_RayHost)
PrefillWorker = ray.remote(**_DEFAULTS)(_RayPrefill)
DecodeWorker = ray.remote(**_DEFAULTS)(_RayDecode)
ColocatedWorker = ray.remote(**_DEFAULTS)(_RayColocated)

__all__ = ["WorkerActor", "PrefillWorker", "DecodeWorker", "ColocatedWorker",
           "PrefillWorkerHost", "DecodeWorkerHost", "ColocatedWorkerHost"]
