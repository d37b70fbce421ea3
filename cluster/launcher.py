"""launch(config) → ClusterHandle: a whole Baton cluster from Python (tests, `baton up`).

Lifecycle, in order (``shutdown()`` undoes it in reverse):
0. Checks that need no Ray: ``pools.prefill_tp`` must shard ``engine.model``
   (``cluster.tp_launcher.check_prefill_tp``: heads, KV heads, MLP width).
1. Ray: ``ray.init`` — local (``include_dashboard=False``, the package's root on
   the workers' PYTHONPATH, ``RAY_AUTH_MODE=disabled`` unless set) or
   ``config.ray.address``. An already initialized Ray is reused and left up.
2. Store: ``redis.url`` if given; else a private ``redis-server`` when the
   binary exists; else the in-process store actor (``memory://baton-store``).
   Which one is logged.
3. Controller: the named actor ``baton-controller`` (detached if
   ``ray.detached``) starts the pools and waits until every worker is ready
   (registered in the store).
4. Router: an actor pinned to this node running ``router.server.build_router``
   behind uvicorn (HTTP) and its gRPC server; ready when it answers.

The handle forwards ``state``/``scale``/``drain`` to the controller, and
exposes ``http_url``, ``grpc_address``, ``store_url`` and the private
``redis`` server (tests stop and restart it to simulate an outage).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.controller import CONTROLLER_NAME, controller_actor
from cluster.ray_errors import remote_cause
from cluster.redis_server import RedisServer, available as redis_available
from cluster.tp_launcher import check_prefill_tp

log = logging.getLogger(__name__)

STORE_ACTOR_NAME = "baton-store"
ROUTER_ACTOR_NAME = "baton-router"
_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ClusterHandle:
    config: ClusterConfig
    store_url: str
    store_kind: str                       # redis | embedded-redis | memory
    controller: Any
    router: Any = None
    http_url: str | None = None
    grpc_address: str | None = None
    redis: RedisServer | None = None
    store_actor: Any = None
    owns_ray: bool = False
    ray_address: str | None = None
    _closed: bool = field(default=False, repr=False)

    def state(self) -> dict:
        import ray

        return ray.get(self.controller.state.remote())

    def scale(self, role: str, n: int, wait: bool = True, timeout_s: float = 600.0) -> dict:
        import ray

        return ray.get(self.controller.scale.remote(role, n, wait, timeout_s))

    def drain(self, worker_id: str, wait: bool = True) -> dict:
        import ray

        return ray.get(self.controller.drain.remote(worker_id, wait))

    def shutdown(self) -> None:
        """Stop router, workers, controller, store, and Ray if this handle started it. Idempotent."""
        import ray

        if self._closed:
            return
        self._closed = True
        if self.router is not None:
            _quiet(lambda: ray.get(self.router.stop.remote(), timeout=15))
            _quiet(lambda: ray.kill(self.router))
        if self.controller is not None:
            _quiet(lambda: ray.get(self.controller.shutdown.remote(), timeout=60))
            _quiet(lambda: ray.kill(self.controller))
        if self.store_actor is not None:
            _quiet(lambda: ray.kill(self.store_actor))
        if self.redis is not None:
            self.redis.stop()
        if self.owns_ray:
            _quiet(ray.shutdown)

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _quiet(fn) -> None:
    try:
        fn()
    except Exception as e:
        log.debug("shutdown step failed: %s", e)


def init_ray(config: ClusterConfig) -> bool:
    """``ray.init`` per ``config.ray``; returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    r = config.ray
    pythonpath = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    kwargs: dict = dict(namespace=r.namespace, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                        logging_level=logging.WARNING, log_to_driver=True)
    if r.address is None:
        kwargs.update(include_dashboard=False, num_cpus=r.num_cpus)
        if r.temp_dir:
            Path(r.temp_dir).mkdir(parents=True, exist_ok=True)
            kwargs["_temp_dir"] = r.temp_dir
        ray.init(**kwargs)
    else:
        ray.init(address=r.address, **kwargs)
    return True


def start_store(config: ClusterConfig, *, local: bool) -> tuple[str, str, RedisServer | None, Any]:
    """(url, kind, private redis or None, store actor or None) per ``config.redis``."""
    if config.redis.url is not None:
        return config.redis.url, "redis", None, None
    if config.redis.embedded_server and redis_available():
        host = "127.0.0.1" if local else "0.0.0.0"
        server = RedisServer(host=host).start()
        url = server.url
        if not local:
            import ray

            url = f"redis://{ray.util.get_node_ip_address()}:{server.port}/0"
        log.info("store: private redis-server at %s", url)
        return url, "embedded-redis", server, None
    from cluster.memory_store import start_store_actor

    actor = create_named_actor(lambda: start_store_actor(STORE_ACTOR_NAME))
    log.info("store: no redis-server binary (or embedded_server off); using the in-process store actor %r",
             STORE_ACTOR_NAME)
    return f"memory://{STORE_ACTOR_NAME}", "memory", None, actor


def router_config(config: ClusterConfig, store_url: str):
    from router.config import RouterConfig

    r = config.router
    return RouterConfig(model=config.engine.model, host=r.host, http_port=r.port, grpc_port=r.grpc_port,
                        redis_url=store_url, namespace=config.redis.namespace, **r.options)


def launch(config: ClusterConfig | None = None, *, start_router: bool = True, worker_factory=None,
           ready_timeout_s: float = 600.0) -> ClusterHandle:
    """Start a cluster per ``config`` and return its handle once it serves."""
    import ray

    config = config or ClusterConfig()
    check_prefill_tp(config)
    owns_ray = init_ray(config)
    handle = ClusterHandle(config, "", "", None, owns_ray=owns_ray,
                           ray_address=ray.get_runtime_context().gcs_address)
    try:
        handle.store_url, handle.store_kind, handle.redis, handle.store_actor = start_store(
            config, local=config.ray.address is None)
        options: dict = {"name": CONTROLLER_NAME, "namespace": config.ray.namespace}
        if config.ray.detached:
            options["lifetime"] = "detached"
        handle.controller = create_named_actor(
            lambda: controller_actor().options(**options).remote(config, handle.store_url, worker_factory))
        try:
            ray.get(handle.controller.start.remote(True, ready_timeout_s))
        except ray.exceptions.RayTaskError as e:   # show the cause, not Ray's remote traceback
            raise remote_cause(e) from None
        if start_router:
            from cluster.router_actor import start_router_actor

            handle.router, handle.http_url, handle.grpc_address = start_router_actor(
                router_config(config, handle.store_url), ROUTER_ACTOR_NAME, config.ray.namespace)
        return handle
    except BaseException:
        handle.shutdown()
        raise


def create_named_actor(create, timeout_s: float = 10.0):
    """Create a named actor, waiting out a previous holder of the name that is still being killed."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return create()
        except ValueError as e:
            if "already" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def temp_ray_dir() -> str:
    """A short private folder for a local Ray's session files (Ray's socket paths must stay short)."""
    return tempfile.mkdtemp(prefix="baton-ray-", dir="/tmp")
