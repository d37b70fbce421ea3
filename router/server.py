"""Wiring: ``build_router(config)`` → (FastAPI app, gRPC server); ``serve(config)`` runs both.

Lifecycle of a router:
1. ``build_router`` makes every part (tokenizer, worker directory, prefix
   index, policy, orchestrator, admission queue, metrics, service) and the two
   frontends. Nothing is started; the parts hang off ``app.state.router``.
2. Startup (the app's lifespan, i.e. uvicorn startup): the directory does its
   first refresh and starts refreshing in the background; a small task keeps
   the gRPC health status in step with the workers.
3. ``serve`` starts the gRPC server and uvicorn, and runs until cancelled or
   uvicorn exits (SIGINT/SIGTERM).
4. Shutdown: gRPC stops (grace period), the lifespan closes the directory, the
   index and the worker clients, after pending aborts finished.

Choices when the config leaves them open: with ``redis_url`` the worker set
comes from the Redis registry and prefix hits from the Redis index (a
``memory://`` URL uses the cluster's in-process store with the same code);
without it, the static ``config.workers`` list and an in-process index
(``InProcessPrefixIndex``) that in-process workers may feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from fastapi import FastAPI

from router.admission import Admission
from router.app import build_app
from router.config import RouterConfig
from router.directory import RedisWorkerDirectory, StaticWorkerDirectory, WorkerDirectory, WorkerView
from router.grpc_server import HealthReporter, build_grpc_server
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.policy import PolicyConfig
from router.prefix_index import InProcessPrefixIndex, PrefixIndex, PrefixIndexReader
from router.service import Service
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)


class ClientPool:
    """One worker client per address, made on first use, closed at shutdown."""

    def __init__(self, factory: Callable[[str], Any] | None = None):
        if factory is None:
            from workers.client import WorkerClient as factory
        self.factory = factory
        self.clients: dict[str, Any] = {}

    def __call__(self, address: str) -> Any:
        client = self.clients.get(address)
        if client is None:
            client = self.clients[address] = self.factory(address)
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
        self.clients.clear()


@dataclass
class RouterState:
    """Every part of one router (``app.state.router``)."""
    config: RouterConfig
    tokenizer: RouterTokenizer
    directory: WorkerDirectory
    index: PrefixIndex
    clients: ClientPool
    metrics: RouterMetrics
    admission: Admission
    orchestrator: Orchestrator
    service: Service
    health: HealthReporter | None = None
    grpc_port: int | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def max_model_len(self) -> int:
        if self.config.max_model_len is not None:
            return self.config.max_model_len
        reported = [v.max_model_len for v in self.directory.views() if v.max_model_len]
        return min(reported) if reported else self.config.default_max_model_len

    def can_serve(self) -> bool:
        return any(v.role in ("decode", "colocated") and v.healthy and not v.draining
                   for v in self.directory.views())

    def health_body(self) -> tuple[int, dict]:
        views = self.directory.views()
        workers: dict[str, dict[str, int]] = {}
        for v in views:
            state = "draining" if v.draining else ("healthy" if v.healthy else "unhealthy")
            workers.setdefault(v.role, {}).setdefault(state, 0)
            workers[v.role][state] += 1
        index_state = "degraded" if self.index.degraded else "ok"
        registry_state = "degraded" if self.directory.degraded else "ok"
        serving = self.can_serve()
        status = "unavailable" if not serving else (
            "degraded" if "degraded" in (index_state, registry_state) else "ok")
        body = {"status": status, "model": self.config.model, "prefix_index": index_state,
                "registry": registry_state, "workers": workers,
                "num_requests_running": self.admission.num_running,
                "num_requests_waiting": self.admission.num_waiting}
        return (200 if serving else 503), body

    def worker_states(self) -> list[tuple[str, str]]:
        return [(v.role, "draining" if v.draining else ("healthy" if v.healthy else "unhealthy"))
                for v in self.directory.views()]

    async def start(self) -> None:
        await self.directory.start()
        if self.health is not None:
            await self.health.update(self.can_serve())
            self._tasks.append(asyncio.create_task(self._health_loop(), name="router.health"))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.directory_refresh_s)
            with contextlib.suppress(Exception):
                await self.health.update(self.can_serve())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.orchestrator.close()
        await self.directory.close()
        await self.index.close()
        await self.clients.close()


def _make_index(config: RouterConfig) -> PrefixIndex:
    if config.redis_url is None:
        log.info("no redis_url: in-process prefix index")
        return InProcessPrefixIndex(max_blocks=config.max_index_blocks)
    return PrefixIndexReader(config.redis_url, config.model, config.namespace, timeout_s=config.index_timeout_s,
                             epoch_ttl_s=config.index_epoch_ttl_s, max_blocks=config.max_index_blocks)


def _make_directory(config: RouterConfig, clients: ClientPool) -> WorkerDirectory:
    if config.redis_url is not None:
        return RedisWorkerDirectory(config.redis_url, config.model, config.namespace, client_for=clients,
                                    refresh_s=config.directory_refresh_s,
                                    stats_timeout_s=config.worker_stats_timeout_s,
                                    unhealthy_after=config.worker_unhealthy_after)
    views = [WorkerView(wid, role, address) for wid, role, address in config.workers]
    return StaticWorkerDirectory(views, client_for=clients, refresh_s=config.directory_refresh_s,
                                 stats_timeout_s=config.worker_stats_timeout_s,
                                 unhealthy_after=config.worker_unhealthy_after)


def build_router(config: RouterConfig, *, tokenizer: RouterTokenizer | None = None,
                 directory: WorkerDirectory | None = None, index: PrefixIndex | None = None,
                 client_factory: Callable[[str], Any] | None = None,
                 with_grpc: bool = True) -> tuple[FastAPI, grpc.aio.Server | None]:
    """The router's two frontends. Parts may be passed in (``baton up`` with in-process
    workers passes its directory and index); the rest follow ``config``."""
    tokenizer = tokenizer or RouterTokenizer.from_path(config.tokenizer or config.model)
    clients = ClientPool(client_factory)
    directory = directory or _make_directory(config, clients)
    index = index or _make_index(config)
    metrics = RouterMetrics(config.model)
    admission = Admission(config.max_running, config.max_queue)
    policy = PolicyConfig(config.local_prefill_threshold, config.decode_affinity_slack)
    orchestrator = Orchestrator(directory, index, clients, metrics, policy, tokenizer.eos_token_ids,
                                config.prefill_attempts, decode_attempts=config.decode_attempts)
    state = RouterState(config, tokenizer, directory, index, clients, metrics, admission, orchestrator, None)
    state.service = Service(config.model_names, tokenizer, orchestrator, admission, metrics, state.max_model_len)
    metrics.running.labels(config.model).set_function(lambda: admission.num_running)
    metrics.waiting.labels(config.model).set_function(lambda: admission.num_waiting)
    metrics.attach_state(index_state=lambda: (index.degraded, getattr(index, "num_errors", 0)),
                         worker_states=state.worker_states)

    grpc_server = None
    if with_grpc and config.grpc_port:
        grpc_server, state.health, state.grpc_port = build_grpc_server(
            state.service, state.max_model_len, config.host, config.grpc_port)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.close()

    app = build_app(state.service, state.health_body, metrics.render, state.max_model_len, config.allow_origins)
    app.router.lifespan_context = lifespan
    app.state.router = state
    return app, grpc_server


async def serve(config: RouterConfig, **parts) -> None:
    """Run the HTTP and gRPC servers until cancelled or uvicorn exits."""
    import uvicorn

    app, grpc_server = build_router(config, **parts)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.http_port, log_level="info",
                                           access_log=False))
    if grpc_server is not None:
        await grpc_server.start()
        log.info("gRPC API on %s:%s", config.host, app.state.router.grpc_port)
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await app.state.router.health.shutdown()
            await grpc_server.stop(grace=5.0)
