"""RouterActor: the router (``router.server.build_router``) inside a Ray actor.

Lifecycle: ``start()`` builds the FastAPI app and the gRPC server, starts the
gRPC server and uvicorn on the actor's event loop, and returns once uvicorn
has run the app's startup (worker directory refreshed) → serving →
``stop()`` asks uvicorn to exit (the app's lifespan closes the directory,
index and clients) and stops gRPC with a grace period.

The actor is pinned to the node that launched the cluster, so the ports in
``config`` are on that host (``baton up`` prints them).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class RouterActor:
    def __init__(self, config) -> None:
        self.config = config
        self._server = None
        self._app = None
        self._grpc = None
        self._task: asyncio.Task | None = None
        self.grpc_port: int | None = None

    async def start(self, timeout_s: float = 120.0) -> tuple[int, int | None]:
        import uvicorn

        from router.server import build_router

        if self._task is not None:
            return self._port(), self.grpc_port
        app, self._grpc = build_router(self.config)
        self._app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host=self.config.host, port=self.config.http_port,
                                                     log_level="warning", access_log=False))
        if self._grpc is not None:
            await self._grpc.start()
            self.grpc_port = app.state.router.grpc_port
        self._task = asyncio.get_running_loop().create_task(self._server.serve())
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                raise RuntimeError(f"router failed to start on {self.config.host}:{self.config.http_port}: "
                                   f"{exc or 'uvicorn exited (port in use?)'}")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("router did not start in time")
            await asyncio.sleep(0.05)
        return self._port(), self.grpc_port

    def _port(self) -> int:
        servers = getattr(self._server, "servers", None) or []
        for s in servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self.config.http_port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._grpc is not None:
            health = self._app.state.router.health
            if health is not None:
                await health.shutdown()
            await self._grpc.stop(grace=2.0)
            self._grpc = None

    async def ping(self) -> bool:
        return self._server is not None and self._server.started


def start_router_actor(config, name: str, namespace: str | None = None, timeout_s: float = 120.0):
    """Start the router actor on this node; returns (actor, http_url, grpc_address or None)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(RouterActor)
    from cluster.launcher import create_named_actor

    actor = create_named_actor(lambda: actor_cls.options(
        name=name, namespace=namespace,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(config))
    try:
        http_port, grpc_port = ray.get(actor.start.remote(timeout_s))
    except BaseException:
        ray.kill(actor)
        raise
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return actor, f"http://{host}:{http_port}", (f"{host}:{grpc_port}" if grpc_port else None)
