"""WorkerHost: one worker = an engine in a mode + an EngineLoop thread + a grpc.aio
server (Worker, KVTransfer, health) + per-worker metrics. Usable in process
(tests) and as the body of the Ray actors in workers/actors.py.

Lifecycle:
  ``WorkerHost(engine_config, role=...)`` (cheap, picklable arguments) →
  ``await start()``: engine built on its thread; server bound on a free port
  (``port=0``); every KV transport serves this worker's held blocks (``grpc``
  on the same server, ``local`` in process, ``nccl`` from GPU memory when the
  engine is on a GPU — its rendezvous store goes into this worker's handles);
  optional /metrics HTTP port;
  optional prefix-index writer on the block-event hook; returns the address →
  serving (one gRPC channel per peer holder, ``channels``: KV pulls and
  Release share it; it closes when the holder is found gone) →
  ``await stop()``: the server stops (in-flight rpcs are cancelled,
  which aborts their requests), then the engine thread and the event hooks.

Roles: ``prefill`` runs the engine in ``mode="prefill"`` (finished prompts are
held until Release, Abort or ``hold_ttl_s``); ``decode`` and ``colocated`` run
``mode="both"`` and serve Decode and Generate (colocated is the label of a
worker the router uses for whole requests).

Block events: every engine step's ``drain_block_events()`` goes to the hooks
in ``on_block_events`` (from a forwarder thread, never the engine thread).
With ``redis_url`` and a ``cluster.prefix_index.PrefixIndexWriter`` available,
a writer for (``worker_id``, ``epoch``, ``index_model``) is added as a hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
from typing import Any, Callable

import grpc

from engine.config import EngineConfig
from kvtransfer.grpc_transport import ChannelPool
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from kvtransfer.registry import ServeContext, available_transports, get_transport
from kvtransfer.wire import GRPC_OPTIONS
from protos.gen import worker_pb2_grpc
from workers.engine_loop import EngineLoop
from workers.kv_source import EngineKVSource
from workers.metrics import WorkerMetrics
from workers.types import WorkerStats

log = logging.getLogger(__name__)

ROLES = {"prefill": "prefill", "decode": "both", "colocated": "both"}


def _make_engine(config: EngineConfig, tp_launcher=None):
    from engine.llm_engine import LLMEngine
    return LLMEngine(config, tp_launcher=tp_launcher)


class WorkerHost:
    def __init__(self, engine_config: EngineConfig, role: str = "colocated", *,
                 worker_id: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, metrics_port: int | None = None,
                 max_waiting: int = 1024, kv_transport: str = "grpc", pull_timeout_s: float = 120.0,
                 expire_interval_s: float = 1.0, redis_url: str | None = None, epoch: str | None = None,
                 index_model: str | None = None, index_namespace: str | None = None,
                 on_block_events: Callable[[list], Any] | list | None = None,
                 kv_transfer_options: dict | None = None, tp_launcher=None, kv_stage_bytes: int | None = None):
        """``tp_launcher``: how the engine starts its other tensor-parallel ranks
        (engine/tp_executor.py; in Ray: cluster.tp_launcher.RayTPLauncher).
        ``kv_stage_bytes``: a prefill worker exports held requests' KV for NCCL
        pulls ahead of time within this budget (kvtransfer/staging.py); default
        1 GiB on a GPU, 0 (off) on CPU."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        if engine_config.mode != ROLES[role]:
            engine_config = dataclasses.replace(engine_config, mode=ROLES[role])
        self.engine_config = engine_config
        self.role = role
        self.worker_id = worker_id or f"{role}-{secrets.token_hex(3)}"
        self.epoch = epoch or secrets.token_hex(8)
        self.bind_host, self.port = host, port
        self.advertise_host = advertise_host or (host if host not in ("0.0.0.0", "::", "") else _node_ip())
        self.metrics_port = metrics_port
        self.max_waiting = max_waiting
        self.kv_transport = kv_transport
        self.pull_timeout_s = pull_timeout_s
        self.redis_url, self.index_model, self.index_namespace = redis_url, index_model, index_namespace
        hooks = on_block_events if isinstance(on_block_events, list) else [on_block_events] if on_block_events else []
        self.kv_transfer_options = kv_transfer_options or {}
        self.kv_stage_bytes = kv_stage_bytes
        self.kv_transport_address = ""   # what kv_transport advertised (nccl: the rendezvous store), for handles
        self.nccl_endpoint = None        # decode side on a GPU: this worker's nccl pairs (kvtransfer.nccl_pairs)
        self.address: str | None = None
        self.layout: KVLayout | None = None
        self.max_model_len = 0
        self.loop = EngineLoop(lambda: _make_engine(self.engine_config, tp_launcher), on_block_events=hooks,
                               on_expired=lambda ids: self.metrics.expired(len(ids)),
                               expire_interval_s=expire_interval_s)
        self.metrics = WorkerMetrics(self.worker_id, role, lambda: self.loop.last_stats)
        self.channels: ChannelPool | None = None
        self.index_writer = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._undo: list[Callable[[], None]] = []

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> str:
        await self.loop.start()
        spec, self.max_model_len, device = await self.loop.call(lambda e: (e.kv_spec, e.max_model_len, e.device))
        self.layout = KVLayout.from_spec(spec, 0, self.engine_config.tensor_parallel_size)
        self.channels = ChannelPool()
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        from workers.servicer import WorkerServicer
        self.servicer = WorkerServicer(self)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self._server)
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        bound = self._server.add_insecure_port(f"{self.bind_host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot bind {self.bind_host}:{self.port}")
        self.port = bound
        self.address = f"{self.advertise_host}:{bound}"
        source = EngineKVSource(self.loop, self.layout)
        stage = self.kv_stage_bytes if self.kv_stage_bytes is not None else (1 << 30 if device.type == "cuda" else 0)
        gpu_source = EngineKVSource(self.loop, self.layout, host_copy=False,    # nccl sends from the GPU
                                    stage_bytes=stage if self.role == "prefill" else 0)
        if gpu_source.staged.budget_bytes:
            self.loop.after_step.append(gpu_source.stage)
        self.kv_sources = {"bytes": source, "device": gpu_source}
        ctx = ServeContext(self.address, self._server, {"grpc": {"on_transfer": self._on_sent,
                                                                 **self.kv_transfer_options},
                                                        "nccl": {"device": device, "host": self.advertise_host}})
        for name in available_transports():
            self._undo.append(get_transport(name).serve(gpu_source if name == "nccl" else source, ctx))
        self.kv_transport_address = ctx.advertised.get(self.kv_transport, "")
        if device.type == "cuda" and self.role != "prefill":
            from kvtransfer.nccl_pairs import PairClient
            self.nccl_endpoint = PairClient(device, self.worker_id)
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("baton.worker.Worker", health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port is not None:
            self._metrics_server, self.metrics_port = self.metrics.serve_http(self.metrics_port, self.bind_host)
        self._attach_index_writer()
        log.info("%s worker %s serving at %s (epoch %s)", self.role, self.worker_id, self.address, self.epoch)
        return self.address

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
        for undo in self._undo:
            undo()
        self._undo.clear()
        await asyncio.to_thread(self.loop.stop)
        engine = self.loop.engine
        if engine is not None and hasattr(engine, "close"):   # TP>1: stop the other ranks' processes
            await asyncio.to_thread(engine.close)
        if self.nccl_endpoint is not None:        # this worker's KV pairs: the holders see EOF
            await asyncio.to_thread(self.nccl_endpoint.close)
        if self.channels is not None:
            await self.channels.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def _attach_index_writer(self) -> None:
        if not self.redis_url:
            return
        try:
            from cluster.prefix_index import PrefixIndexWriter
        except ImportError:
            log.info("no cluster.prefix_index module: block events are not indexed")
            return
        try:
            from cluster.store import connect
            client = connect(self.redis_url)
        except ImportError:
            import redis
            client = redis.Redis.from_url(self.redis_url)
        kwargs = {"namespace": self.index_namespace} if self.index_namespace else {}
        self.index_writer = PrefixIndexWriter(client, self.worker_id, self.epoch,
                                              self.index_model or self.engine_config.model, **kwargs)
        self.loop.add_block_event_hook(self.index_writer.apply)

    # ---- used by the servicer -------------------------------------------------------------
    def _on_sent(self, stats, state, error) -> None:
        from kvtransfer.base import TransferState
        self.metrics.transfer(stats, state is TransferState.DONE)

    async def release_remote(self, handle: KVHandle) -> None:
        """Tell the holder it may drop its hold (never raises: the TTL is the backstop).
        Release rides the channel the pull used (``self.channels``); a holder that is
        gone (UNAVAILABLE) has its channel closed."""
        from workers.client import WorkerClient
        from workers.errors import WorkerError
        address = handle.source_address
        try:
            await WorkerClient(address, channel=self.channels.get(address)).release(handle.request_id)
        except Exception as e:
            log.warning("release of %s on %s failed: %s", handle.request_id, address, e)
            if isinstance(e, WorkerError) and e.code == "UNAVAILABLE":
                self.channels.discard(address)

    # ---- queries ------------------------------------------------------------------------
    async def stats(self) -> WorkerStats:
        s = await self.engine_stats()
        kv = self.metrics.kv_total
        return WorkerStats(
            **dataclasses.asdict(s), worker_id=self.worker_id, role=self.role, address=self.address or "",
            epoch=self.epoch, kv_transfers=kv["transfers"], kv_transfer_bytes=kv["bytes"],
            kv_transfer_seconds=kv["seconds"], kv_transfer_failures=kv["failures"],
            num_expired_holds=kv["expired"], metrics_port=self.metrics_port or 0, layout=self.layout,
            max_model_len=self.max_model_len, max_waiting=self.max_waiting)

    async def engine_stats(self):
        """The engine's own EngineStats (exact: taken on the engine thread)."""
        return await self.loop.call(lambda e: e.stats())

    async def run_on_engine(self, fn: Callable, *args) -> Any:
        """Run ``fn(engine, *args)`` on the engine thread (tests, admin tools)."""
        return await self.loop.call(fn, *args)

    def metrics_text(self) -> str:
        return self.metrics.text()

    def get_address(self) -> str | None:
        return self.address


def _node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class PrefillWorkerHost(WorkerHost):
    def __init__(self, engine_config: EngineConfig, **kwargs):
        super().__init__(engine_config, "prefill", **kwargs)


class DecodeWorkerHost(WorkerHost):
    def __init__(self, engine_config: EngineConfig, **kwargs):
        super().__init__(engine_config, "decode", **kwargs)


class ColocatedWorkerHost(WorkerHost):
    def __init__(self, engine_config: EngineConfig, **kwargs):
        super().__init__(engine_config, "colocated", **kwargs)
