"""A fake worker actor for controller tests: registers and heartbeats like the
real ManagedWorker, but has no engine; its load is set by the test."""

from __future__ import annotations

import asyncio
import os

from cluster.registry import Registry, WorkerInfo
from cluster.store import connect


class FakeWorker:
    def __init__(self, spec):
        self.spec = spec
        self.busy = 0
        self.info = None
        self._beat = None

    async def ready(self) -> str:
        if self.spec.engine.model == "fail":
            raise RuntimeError("model failed to load")
        s = self.spec
        self.info = WorkerInfo(s.worker_id, s.role, f"127.0.0.1:{10000 + os.getpid() % 50000}",
                               model=s.engine.model)
        self.registry = Registry(connect(s.store_url, asyncio=True), s.namespace, s.heartbeat_ttl_s)
        await self.registry.aregister(self.info)
        self._beat = asyncio.get_running_loop().create_task(self._loop())
        return self.info.address

    async def _loop(self):
        while True:
            await asyncio.sleep(self.spec.heartbeat_interval_s)
            await self.registry.aheartbeat(self.info, {"num_running": self.busy})

    async def stats(self) -> dict:
        return {"num_running": self.busy, "num_waiting": 0, "num_held": 0, "epoch": self.info.epoch}

    async def set_busy(self, n: int) -> None:
        self.busy = n

    async def shutdown(self) -> None:
        if self._beat is not None:
            self._beat.cancel()

    def crash(self) -> None:
        os._exit(1)


def fake_factory(role: str):
    import ray

    return ray.remote(max_restarts=0)(FakeWorker)
