"""In-process stand-in for Redis: the subset of commands Baton's registry,
prefix-index writer and router reader use, with the same text semantics as a
``decode_responses=True`` redis-py client.

Why: `baton up` without a redis-server binary still needs a registry and a
prefix index shared by the router and every worker. One ``MemoryStore`` holds
the data; clients speak redis-py's API to it, so ``cluster.registry``,
``cluster.prefix_index`` and ``router/prefix_index.py`` run unchanged on either.

Where the store lives (``cluster.store.connect(url)`` picks):
- ``memory://`` — the process-wide ``local_store()`` (tests, one process).
- ``memory://NAME`` — a Ray actor named NAME (in the caller's Ray namespace),
  started by the launcher with ``start_store_actor(NAME)``; every worker and the
  router reach the same data. A pipeline is one actor call.

Lifecycle: the launcher starts the actor before the controller, and kills it
after the controller on shutdown; data dies with it (like the private
redis-server, nothing persists).

Clients: ``MemoryRedis`` (sync: ``client.hset(...)``, ``client.pipeline()``)
and ``AsyncMemoryRedis`` (``await client.hget(...)``; pipeline commands queue
synchronously, ``await pipe.execute()``), as in ``redis.asyncio``. A dead actor
raises ``redis.exceptions.ConnectionError``, so callers handle one error type.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Command = tuple[str, tuple, dict]


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, bool):
        raise ResponseError("invalid value type bool")
    if isinstance(v, (str, int, float)):
        return str(v) if not isinstance(v, float) else repr(v)
    raise ResponseError(f"invalid value type {type(v).__name__}")


def _flat(first, rest: tuple) -> list:
    if isinstance(first, (list, tuple, set)):
        return [*first, *rest]
    return [first, *rest]


class MemoryStore:
    """Dict-backed key space. Values: str (strings), dict (hashes), set (sets).
    ``execute(commands)`` runs a batch in order under one lock, like a pipeline."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._expires: dict[str, float] = {}
        self._lock = threading.Lock()

    def execute(self, commands: list[Command]) -> list:
        out = []
        with self._lock:
            for name, args, kwargs in commands:
                fn = getattr(self, f"_cmd_{name}", None)
                if fn is None:
                    raise ResponseError(f"unknown command {name!r}")
                out.append(fn(*args, **kwargs))
        return out

    # -- key space --------------------------------------------------------
    def _get(self, key: str, kind: type | None = None):
        deadline = self._expires.get(key)
        if deadline is not None and deadline <= time.monotonic():
            self._data.pop(key, None)
            self._expires.pop(key, None)
        v = self._data.get(key)
        if v is not None and kind is not None and not isinstance(v, kind):
            raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def _drop_if_empty(self, key: str) -> None:
        if not self._data.get(key):
            self._data.pop(key, None)
            self._expires.pop(key, None)

    def _cmd_ping(self):
        return True

    def _cmd_flushdb(self):
        self._data.clear()
        self._expires.clear()
        return True

    def _cmd_delete(self, *names):
        n = 0
        for k in names:
            if self._get(k) is not None:
                n += 1
            self._data.pop(k, None)
            self._expires.pop(k, None)
        return n

    def _cmd_exists(self, *names):
        return sum(1 for k in names if self._get(k) is not None)

    def _cmd_expire(self, name, time_s):
        if self._get(name) is None:
            return False
        self._expires[name] = time.monotonic() + float(time_s)
        return True

    def _cmd_ttl(self, name):
        if self._get(name) is None:
            return -2
        deadline = self._expires.get(name)
        return -1 if deadline is None else max(0, round(deadline - time.monotonic()))

    def _cmd_keys(self, pattern="*"):
        return [k for k in list(self._data) if self._get(k) is not None and fnmatch.fnmatchcase(k, pattern)]

    # -- strings ----------------------------------------------------------
    def _cmd_get(self, name):
        return self._get(name, str)

    def _cmd_set(self, name, value, ex=None, px=None, nx=False, xx=False):
        exists = self._get(name) is not None
        if (nx and exists) or (xx and not exists):
            return None
        self._data[name] = _text(value)
        self._expires.pop(name, None)
        if ex is not None:
            self._expires[name] = time.monotonic() + float(ex)
        elif px is not None:
            self._expires[name] = time.monotonic() + float(px) / 1000.0
        return True

    def _cmd_mget(self, keys, *args):
        return [self._get(k, str) for k in _flat(keys, args)]

    # -- hashes -----------------------------------------------------------
    def _cmd_hset(self, name, key=None, value=None, mapping=None, items=None):
        pairs = list((mapping or {}).items())
        if key is not None:
            pairs.insert(0, (key, value))
        if items:
            pairs += list(zip(items[::2], items[1::2]))
        if not pairs:
            raise ResponseError("'hset' with no key value pairs")
        h = self._get(name, dict)
        if h is None:
            h = self._data[name] = {}
        added = 0
        for k, v in pairs:
            k = _text(k)
            added += k not in h
            h[k] = _text(v)
        return added

    def _cmd_hsetnx(self, name, key, value):
        h = self._get(name, dict)
        if h is None:
            h = self._data[name] = {}
        if _text(key) in h:
            return False
        h[_text(key)] = _text(value)
        return True

    def _cmd_hget(self, name, key):
        h = self._get(name, dict)
        return None if h is None else h.get(_text(key))

    def _cmd_hmget(self, name, keys, *args):
        h = self._get(name, dict) or {}
        return [h.get(_text(k)) for k in _flat(keys, args)]

    def _cmd_hgetall(self, name):
        return dict(self._get(name, dict) or {})

    def _cmd_hkeys(self, name):
        return list(self._get(name, dict) or {})

    def _cmd_hlen(self, name):
        return len(self._get(name, dict) or {})

    def _cmd_hexists(self, name, key):
        return _text(key) in (self._get(name, dict) or {})

    def _cmd_hdel(self, name, *keys):
        h = self._get(name, dict)
        if h is None:
            return 0
        n = sum(1 for k in keys if h.pop(_text(k), None) is not None)
        self._drop_if_empty(name)
        return n

    # -- sets -------------------------------------------------------------
    def _cmd_sadd(self, name, *values):
        s = self._get(name, set)
        if s is None:
            s = self._data[name] = set()
        before = len(s)
        s.update(_text(v) for v in values)
        return len(s) - before

    def _cmd_srem(self, name, *values):
        s = self._get(name, set)
        if s is None:
            return 0
        before = len(s)
        s.difference_update(_text(v) for v in values)
        self._drop_if_empty(name)
        return before - len(s)

    def _cmd_smembers(self, name):
        return set(self._get(name, set) or ())

    def _cmd_scard(self, name):
        return len(self._get(name, set) or ())

    def _cmd_sismember(self, name, value):
        return _text(value) in (self._get(name, set) or ())


COMMANDS = sorted(n[len("_cmd_"):] for n in dir(MemoryStore) if n.startswith("_cmd_"))

_LOCAL: MemoryStore | None = None
_LOCAL_LOCK = threading.Lock()


def local_store() -> MemoryStore:
    """The process-wide store behind ``memory://`` (created on first use)."""
    global _LOCAL
    with _LOCAL_LOCK:
        if _LOCAL is None:
            _LOCAL = MemoryStore()
        return _LOCAL


# -- Ray actor -------------------------------------------------------------

def start_store_actor(name: str, *, namespace: str | None = None):
    """Start the named store actor; returns its handle. Needs ``ray.init`` first; raises
    ValueError if an actor of that name exists."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(MemoryStore)
    return actor_cls.options(name=name, namespace=namespace).remote()


_CALL_TIMEOUT_S = 5.0


def _actor_error(e: Exception) -> Exception:
    return RedisConnectionError(f"in-process store unreachable: {e}")


# -- clients ---------------------------------------------------------------

class _Backend:
    """Runs a command batch on a local store or a Ray actor handle."""

    def __init__(self, target: MemoryStore | Any) -> None:
        self._target = target
        self.is_local = isinstance(target, MemoryStore)

    def run(self, commands: list[Command]) -> list:
        if self.is_local:
            return self._target.execute(commands)
        try:
            # a Future, not ray.get: callers are threads of async actors (index writers), where
            # ray.get would warn about blocking the event loop it is not on
            return self._target.execute.remote(commands).future().result(timeout=_CALL_TIMEOUT_S)
        except ResponseError:
            raise
        except Exception as e:  # actor died or unreachable
            raise _actor_error(e) from None

    async def arun(self, commands: list[Command]) -> list:
        if self.is_local:
            return self._target.execute(commands)
        import asyncio

        try:
            return await asyncio.wait_for(self._target.execute.remote(commands), _CALL_TIMEOUT_S)
        except ResponseError:
            raise
        except Exception as e:
            raise _actor_error(e) from None


class _Queue:
    """Command methods that append to ``self._commands`` (pipelines)."""

    def _queue(self, name: str, args: tuple, kwargs: dict):
        self._commands.append((name, args, kwargs))
        return self


class MemoryPipeline(_Queue):
    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._commands: list[Command] = []

    def execute(self) -> list:
        commands, self._commands = self._commands, []
        return self._backend.run(commands) if commands else []

    def __len__(self) -> int:
        return len(self._commands)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._commands = []


class AsyncMemoryPipeline(_Queue):
    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._commands: list[Command] = []

    async def execute(self) -> list:
        commands, self._commands = self._commands, []
        return await self._backend.arun(commands) if commands else []

    def __len__(self) -> int:
        return len(self._commands)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self._commands = []


class MemoryRedis:
    """redis-py-like sync client over a MemoryStore or its actor."""

    def __init__(self, target: MemoryStore | Any) -> None:
        self._backend = _Backend(target)

    def pipeline(self, transaction: bool = False) -> MemoryPipeline:
        return MemoryPipeline(self._backend)

    def close(self) -> None:
        pass


class AsyncMemoryRedis:
    """redis.asyncio-like client over a MemoryStore or its actor."""

    def __init__(self, target: MemoryStore | Any) -> None:
        self._backend = _Backend(target)

    def pipeline(self, transaction: bool = False) -> AsyncMemoryPipeline:
        return AsyncMemoryPipeline(self._backend)

    async def aclose(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _install_commands() -> None:
    def queued(name):
        def method(self, *args, **kwargs):
            return self._queue(name, args, kwargs)
        method.__name__ = name
        return method

    def sync(name):
        def method(self, *args, **kwargs):
            return self._backend.run([(name, args, kwargs)])[0]
        method.__name__ = name
        return method

    def asyn(name):
        async def method(self, *args, **kwargs):
            return (await self._backend.arun([(name, args, kwargs)]))[0]
        method.__name__ = name
        return method

    for name in COMMANDS:
        setattr(_Queue, name, queued(name))
        setattr(MemoryRedis, name, sync(name))
        setattr(AsyncMemoryRedis, name, asyn(name))


_install_commands()
