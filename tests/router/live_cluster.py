"""A live cluster for end-to-end router tests: real workers, real Redis, real HTTP and gRPC servers."""

from __future__ import annotations

import asyncio
import socket
import threading

LIVE_MODEL = "tiny"
LIVE_BLOCK_SIZE = 16
LIVE_MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_engine_config(model_dir, **kw):
    from engine.config import EngineConfig

    return EngineConfig(model=str(model_dir), block_size=LIVE_BLOCK_SIZE, num_kv_blocks=256,
                        max_model_len=LIVE_MAX_MODEL_LEN, max_num_batched_tokens=512, **kw)


class LiveCluster:
    """Two prefill workers, one decode worker (``workers.host.WorkerHost``, in process),
    registered in a real Redis with the cluster's heartbeat and prefix-index writer, and
    the router (``router.server.serve``: uvicorn + gRPC) — all on one event loop in a
    background thread, so tests use the official *sync* clients against real sockets.

    Lifecycle: ``start()`` → tests (``call(coro)`` runs a coroutine on the cluster's
    loop) → ``stop()``."""

    def __init__(self, model_dir, redis_url: str, **router_options):
        self.model_dir = model_dir
        self.redis_url = redis_url
        self.router_options = router_options
        self.http_port, self.grpc_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-cluster", daemon=True)
        self.hosts = {}
        self.heartbeats = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "LiveCluster":
        self.thread.start()
        self.call(self._start_workers())
        self._register()
        self.router_task = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        self._wait_ready()
        return self

    async def _start_workers(self):
        from workers.host import WorkerHost

        # the decode worker schedules asynchronously, as on a GPU (one step in flight)
        for wid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
            cfg = live_engine_config(self.model_dir, async_scheduling=role == "decode")
            self.hosts[wid] = WorkerHost(cfg, role, worker_id=wid,
                                         redis_url=self.redis_url, index_model=LIVE_MODEL)
        await asyncio.gather(*(h.start() for h in self.hosts.values()))

    def _register(self):
        import redis

        from cluster.registry import Heartbeat, Registry, WorkerInfo

        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        registry = Registry(self.redis, ttl_s=5.0)
        for wid, host in self.hosts.items():
            info = WorkerInfo(wid, host.role, host.address, epoch=host.epoch, model=LIVE_MODEL,
                              block_size=LIVE_BLOCK_SIZE, max_model_len=LIVE_MAX_MODEL_LEN)
            registry.register(info)
            self.heartbeats.append(Heartbeat(registry, info, interval_s=0.5).start())

    async def _serve(self):
        from router.config import RouterConfig
        from router.server import serve

        config = RouterConfig(model=LIVE_MODEL, tokenizer=str(self.model_dir), host="127.0.0.1",
                              http_port=self.http_port, grpc_port=self.grpc_port, redis_url=self.redis_url,
                              directory_refresh_s=0.2, **self.router_options)
        await serve(config)

    def _wait_ready(self, timeout_s=30.0):
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.router_task.done():
                self.router_task.result()
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("router did not become healthy")

    def worker_stats(self):
        return {wid: self.call(h.engine_stats()) for wid, h in self.hosts.items()}

    async def _stop_workers(self):
        await asyncio.gather(*(h.stop() for h in self.hosts.values()), return_exceptions=True)

    def stop(self):
        self.router_task.cancel()
        for hb in self.heartbeats:
            hb.stop()
        self.call(self._stop_workers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.redis.close()
