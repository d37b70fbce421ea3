"""ManagedWorker: the Ray actor the controller starts — a ``workers.WorkerHost``
plus its life in the registry.

Lifecycle (one actor = one worker start = one epoch):
1. ``ManagedWorker.remote(spec)`` — cheap; nothing loads yet.
2. ``ready()`` — the host starts (engine loaded, gRPC server bound, prefix-index
   writer on its block events, /metrics port), then the worker registers
   itself (``WorkerInfo`` with its address and epoch) and starts heartbeating
   from the actor's event loop (``registry.Heartbeat.run``): alive key + stats every
   ``heartbeat_interval_s``, and ``writer.maintain()`` so the index heals after
   a Redis outage. Returns the address; from now on routers may use it.
3. ``stats()`` — the host's ``WorkerStats`` (the controller polls it).
4. ``shutdown()`` — heartbeats stop, the worker deregisters (its index
   entries go with it), then the host stops. The controller calls it only
   after draining, and kills the actor afterwards.

Tensor parallelism (``spec.tp > 1``): this actor is rank 0 and sits in bundle 0
of ``spec.placement_group``; its engine is ``LLMEngine(config,
tp_launcher=RayTPLauncher(pg))``, which starts ranks 1..tp-1 as actors in the
other bundles (cluster/tp_launcher.py) during ``ready()``. ``shutdown()``
stops them with the engine; the controller removes the group afterwards.
``placement()`` says where every rank runs (pid, node, GPU ids, the CUDA
devices each process sees): this actor's own report and each rank actor's.

Workers heartbeat themselves (not the controller), so serving survives a dead
controller; a worker that crashes stops heartbeating and is dead to routers
within ``heartbeat_ttl_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from cluster.types import WorkerSpec, as_dict

log = logging.getLogger(__name__)


class ManagedWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.host = None
        self.info = None
        self._registry = None
        self._heartbeat = None                      # cluster.registry.Heartbeat, from ready()
        self._beat: asyncio.Task | None = None      # its asyncio driver
        self._tp_launcher = None                    # cluster.tp_launcher.RayTPLauncher when tp > 1

    def _make_host(self):
        from workers.host import WorkerHost

        s = self.spec
        advertise = None
        if s.host == "0.0.0.0":
            import ray

            advertise = ray.util.get_node_ip_address()
        launcher = None
        if s.engine.tensor_parallel_size > 1:      # the other ranks live in this worker's placement group
            from cluster.tp_launcher import RayTPLauncher
            launcher = self._tp_launcher = RayTPLauncher(self._placement_group())
        host = WorkerHost(s.engine, s.role, worker_id=s.worker_id, host=s.host, advertise_host=advertise,
                          metrics_port=0 if s.metrics else None, redis_url=s.store_url,
                          index_model=s.engine.model, index_namespace=s.namespace, tp_launcher=launcher,
                          kv_transport=s.kv_transport)
        return host

    def _placement_group(self):
        import ray

        pg = self.spec.placement_group or ray.util.get_current_placement_group()
        if pg is None:
            raise ValueError(f"{self.spec.worker_id}: TP={self.spec.engine.tensor_parallel_size} needs the worker "
                             "to run in a placement group of one bundle per rank (cluster.tp_launcher)")
        return pg

    async def ready(self) -> str:
        from cluster.registry import Heartbeat, Registry, WorkerInfo
        from cluster.store import connect

        if self.host is not None and self.host.address:
            return self.host.address
        self.host = self._make_host()
        address = await self.host.start()
        s = self.spec
        self.info = WorkerInfo(worker_id=s.worker_id, role=s.role, address=address, epoch=str(self.host.epoch),
                               model=s.engine.model, block_size=s.engine.block_size,
                               max_model_len=self.host.max_model_len)
        self._registry = Registry(connect(s.store_url, asyncio=True), s.namespace, s.heartbeat_ttl_s)
        await self._registry.aregister(self.info, await self._stats_dict())
        self._heartbeat = Heartbeat(self._registry, self.info, s.heartbeat_interval_s,
                                    stats_fn=self._stats_dict, writer=self.host.index_writer)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat.run())
        return address

    async def _stats_dict(self) -> dict:
        return as_dict(await self.host.stats())

    async def stats(self) -> dict:
        out = await self._stats_dict()
        out["heartbeat_ok"] = self._heartbeat.ok if self._heartbeat is not None else True
        writer = self.host.index_writer if self.host is not None else None
        if writer is not None:
            out["index_blocks"] = writer.num_blocks
            out["index_healthy"] = writer.healthy
        return out

    async def placement(self) -> list[dict]:
        """Where each TP rank of this worker runs, as its process sees it (``tp_launcher.device_report``):
        rank 0 is this actor; ranks 1.. answer once they have started (after ``ready()``)."""
        from cluster.tp_launcher import device_report

        ranks = [{"rank": 0, **device_report()}]
        launched = self._tp_launcher.ranks if self._tp_launcher is not None else None
        if launched is not None:
            ranks += list(await asyncio.gather(*launched.reports))
        return ranks

    async def address(self) -> str | None:
        return self.host.address if self.host is not None else None

    async def shutdown(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
            self._beat = None
        if self._registry is not None:
            try:
                await asyncio.wait_for(self._registry.aderegister(self.spec.worker_id), 5.0)
            except Exception as e:
                log.warning("%s: deregister failed: %s", self.spec.worker_id, e)
        if self.host is not None:
            await self.host.stop()

    def ping(self) -> str:
        return self.spec.worker_id


@functools.lru_cache(maxsize=None)
def managed_worker_actor():
    """``ManagedWorker`` as a Ray actor class (resources are set per worker by the controller)."""
    import ray

    return ray.remote(max_restarts=0)(ManagedWorker)


def worker_factory(role: str):
    return managed_worker_actor()

