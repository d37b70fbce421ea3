"""``connect(url)``: one place that turns a store URL into a client.

- ``redis://host:port/db`` (also ``rediss://``, ``unix://``): a redis-py client
  with ``decode_responses=True`` and short socket timeouts, so a dead Redis
  fails fast (the router then routes by load alone) instead of hanging a step.
- ``memory://`` — the process-wide in-process store; ``memory://NAME`` — the
  store actor NAME in the caller's Ray namespace (``cluster.memory_store``).

Both kinds speak the same subset of redis-py's API, sync or asyncio.
"""

from __future__ import annotations

from typing import Any

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 1.0


def is_memory_url(url: str) -> bool:
    return url.startswith("memory://")


def connect(url: str, *, asyncio: bool = False) -> Any:
    """A sync client (``asyncio=False``) or a ``redis.asyncio``-style client."""
    if is_memory_url(url):
        from cluster import memory_store

        name = url[len("memory://"):].strip("/")
        if name:
            import ray

            try:
                target = ray.get_actor(name)
            except ValueError:
                raise ValueError(f"no in-process store actor named {name!r} (is the cluster up?)") from None
        else:
            target = memory_store.local_store()
        return memory_store.AsyncMemoryRedis(target) if asyncio else memory_store.MemoryRedis(target)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"store url must be redis://, rediss://, unix:// or memory://, got {url!r}")
    kwargs = dict(decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
                  socket_timeout=SOCKET_TIMEOUT_S)
    if asyncio:
        import redis.asyncio as aredis

        return aredis.Redis.from_url(url, **kwargs)
    import redis

    return redis.Redis.from_url(url, **kwargs)
