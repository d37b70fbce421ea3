"""The worker set the router routes over: who exists, in which role, and how loaded.

``WorkerDirectory`` is the interface the orchestrator reads (``views()``, a
snapshot, never blocking). Two implementations:

- ``StaticWorkerDirectory``: a fixed list of workers (tests, ``baton up`` with
  in-process workers).
- ``RedisWorkerDirectory``: the registry the workers heartbeat into
  (``cluster.keys.workers_key``: worker_id → JSON WorkerInfo with at least
  worker_id, role, address, epoch, block_size, model, draining; a worker is
  alive while ``alive_key`` exists and equals its epoch; its heartbeat's load
  numbers are in ``stats_key``). Two round trips per refresh.

Lifecycle: ``start()`` refreshes once and then every ``refresh_s`` in a
background task; each refresh (1) lists the members, (2) polls every member's
stats through its client (``client.stats()``, bounded by ``stats_timeout_s``;
skipped when the registry already gave fresh stats), and (3)
swaps in a new snapshot. A member whose stats poll fails is kept but marked
unhealthy until a later poll succeeds — at once when the poll errs (refused,
unavailable: the worker is gone), only after ``unhealthy_after`` timeouts in a
row when it is merely slow (a busy worker answers late; until then it keeps its
last known load), so one late answer does not take a loaded worker out of
routing and pile its share onto the others. If Redis is unreachable the last
snapshot stays (``degraded`` is set). ``close()`` stops the task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from cluster import keys
from router.prefix_index import connect_async

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerLoad:
    """The load numbers the policy uses (from ``WorkerClient.stats()`` or a heartbeat)."""
    num_running: int = 0
    num_waiting: int = 0
    num_held: int = 0
    num_free_blocks: int | None = None
    num_total_blocks: int | None = None
    kv_cache_usage: float = 0.0

    @classmethod
    def from_any(cls, stats: Any) -> "WorkerLoad":
        """From a stats object or dict with (a subset of) these field names."""
        get = stats.get if isinstance(stats, dict) else (lambda k, d=None: getattr(stats, k, d))
        return cls(num_running=int(get("num_running", 0) or 0),
                   num_waiting=int(get("num_waiting", 0) or 0),
                   num_held=int(get("num_held", 0) or 0),
                   num_free_blocks=_opt_int(get("num_free_blocks", None)),
                   num_total_blocks=_opt_int(get("num_total_blocks", None)),
                   kv_cache_usage=float(get("kv_cache_usage", 0.0) or 0.0))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    role: str                        # prefill | decode | colocated
    address: str                     # host:port of the worker's gRPC server
    draining: bool = False
    stats: WorkerLoad | None = None  # None: not polled yet
    healthy: bool = True
    epoch: str | None = None
    block_size: int = 16
    model: str | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {self.role!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def from_info(cls, info: dict) -> "WorkerView":
        """From a registry WorkerInfo dict (unknown keys ignored)."""
        stats = info.get("stats")
        return cls(worker_id=str(info["worker_id"]), role=str(info["role"]), address=str(info["address"]),
                   draining=bool(info.get("draining", False)),
                   stats=WorkerLoad.from_any(stats) if isinstance(stats, dict) else None,
                   epoch=None if info.get("epoch") is None else str(info["epoch"]),
                   block_size=int(info.get("block_size", 16)), model=info.get("model"),
                   max_model_len=_opt_int(info.get("max_model_len")))


class WorkerDirectory:
    """Base: a snapshot of worker views, refreshed in the background."""

    def __init__(self, client_for: Callable[[str], Any] | None = None, refresh_s: float = 1.0,
                 stats_timeout_s: float = 0.5, unhealthy_after: int = 3):
        self._client_for = client_for
        self.refresh_s = refresh_s
        self.stats_timeout_s = stats_timeout_s
        self.unhealthy_after = unhealthy_after
        self._timeouts: dict[str, int] = {}      # worker_id → stats polls timed out in a row
        self._views: list[WorkerView] = []
        self._task: asyncio.Task | None = None
        self.degraded = False
        self.refreshed_at: float | None = None

    def views(self) -> list[WorkerView]:
        return list(self._views)

    def get(self, worker_id: str) -> WorkerView | None:
        return next((v for v in self._views if v.worker_id == worker_id), None)

    async def _list_members(self) -> list[WorkerView] | None:
        """Current members, or None if the source is unreachable (keep the old snapshot)."""
        raise NotImplementedError

    async def refresh(self) -> None:
        members = await self._list_members()
        if members is None:
            return
        self._views = await self._with_stats(members)
        self.refreshed_at = time.monotonic()

    async def _with_stats(self, members: list[WorkerView]) -> list[WorkerView]:
        if self._client_for is None:
            return members
        return list(await asyncio.gather(*(self._poll(v) for v in members)))

    async def _poll(self, view: WorkerView) -> WorkerView:
        if view.stats is not None:
            return view
        try:
            stats = await asyncio.wait_for(self._client_for(view.address).stats(), self.stats_timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            missed = self._timeouts[view.worker_id] = self._timeouts.get(view.worker_id, 0) + 1
            last = self.get(view.worker_id)
            if missed < self.unhealthy_after and last is not None and last.healthy:
                log.info("worker %s (%s) stats poll timed out (%d in a row)", view.worker_id, view.address, missed)
                return replace(view, stats=last.stats, max_model_len=last.max_model_len,
                               block_size=last.block_size)
            log.warning("worker %s (%s) missed %d stats polls: unhealthy", view.worker_id, view.address, missed)
            return replace(view, healthy=False)
        except Exception as e:
            log.warning("worker %s (%s) stats poll failed: %s", view.worker_id, view.address, e)
            return replace(view, healthy=False)
        self._timeouts.pop(view.worker_id, None)
        # A polled worker also tells its context limit and KV block size.
        max_len = getattr(stats, "max_model_len", None) or view.max_model_len
        layout = getattr(stats, "layout", None)
        block_size = getattr(layout, "block_size", None) or view.block_size
        return replace(view, stats=WorkerLoad.from_any(stats), healthy=True, max_model_len=max_len,
                       block_size=int(block_size))

    async def start(self) -> None:
        await self._safe_refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"{type(self).__name__}.refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._safe_refresh()

    async def _safe_refresh(self) -> None:
        try:
            await self.refresh()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker directory refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class StaticWorkerDirectory(WorkerDirectory):
    """A fixed list of workers; only their stats change."""

    def __init__(self, workers: Sequence[WorkerView], client_for: Callable[[str], Any] | None = None,
                 refresh_s: float = 1.0, stats_timeout_s: float = 0.5, unhealthy_after: int = 3):
        super().__init__(client_for, refresh_s, stats_timeout_s, unhealthy_after)
        ids = [w.worker_id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate worker ids in {ids}")
        self._members = [replace(w, stats=None) if client_for else w for w in workers]
        self._views = list(workers)

    async def _list_members(self) -> list[WorkerView]:
        return list(self._members)


class RedisWorkerDirectory(WorkerDirectory):
    """Members from the Redis registry: one HGETALL of the registry and one MGET of the alive keys."""

    def __init__(self, redis_url: str, model: str | None = None, namespace: str = keys.DEFAULT_NAMESPACE,
                 client_for: Callable[[str], Any] | None = None, refresh_s: float = 1.0,
                 stats_timeout_s: float = 0.5, timeout_s: float = 0.5, restart_grace_s: float = 5.0,
                 unhealthy_after: int = 3):
        super().__init__(client_for, refresh_s, stats_timeout_s, unhealthy_after)
        self.model = model
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.restart_grace_s = restart_grace_s
        self._unreachable_at: float | None = None
        self._registry_empty = False
        self._redis = connect_async(redis_url, timeout_s)

    async def _list_members(self) -> list[WorkerView] | None:
        try:
            members = await asyncio.wait_for(self._read(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.degraded:
                log.warning("worker registry unreachable (%s); keeping the last snapshot", e)
            self.degraded = True
            self._unreachable_at = time.monotonic()
            return None
        self.degraded = False
        return self._bridge_restart(members)

    def _bridge_restart(self, members: list[WorkerView]) -> list[WorkerView]:
        """A Redis that restarted empty lists no workers until their next heartbeat: for
        ``restart_grace_s`` after an outage, or after the registry hash itself vanished,
        the workers of the last snapshot that the listing lacks stay routable (their
        stats are polled again, so a dead one still turns unhealthy)."""
        now = time.monotonic()
        if members and not (self._unreachable_at and now - self._unreachable_at < self.restart_grace_s):
            self._unreachable_at = None
            return members
        if self._registry_empty and self._views and self._unreachable_at is None:
            self._unreachable_at = now          # the registry itself is gone, with no error: Redis lost its data
        if self._unreachable_at is None or now - self._unreachable_at >= self.restart_grace_s:
            return members
        listed = {v.worker_id for v in members}
        return members + [replace(v, stats=None) for v in self._views if v.worker_id not in listed]

    async def _read(self) -> list[WorkerView]:
        raw = await self._redis.hgetall(keys.workers_key(self.namespace))
        self._registry_empty = not raw
        infos = []
        for wid, text in sorted(raw.items()):
            try:
                view = WorkerView.from_info(json.loads(_text(text)))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring malformed registry entry %s: %s", wid, e)
                continue
            if self.model is None or view.model in (None, self.model):
                infos.append(view)
        if not infos:
            return []
        pipe = self._redis.pipeline(transaction=False)
        pipe.mget([keys.alive_key(v.worker_id, self.namespace) for v in infos])
        pipe.mget([keys.stats_key(v.worker_id, self.namespace) for v in infos])
        epochs, stats = await pipe.execute()
        live = []
        for view, epoch, st in zip(infos, epochs, stats):
            if epoch is None or (view.epoch is not None and _text(epoch) != view.epoch):
                continue
            if st is not None and view.stats is None:
                try:
                    view = replace(view, stats=WorkerLoad.from_any(json.loads(st)))
                except (ValueError, TypeError):
                    pass
            live.append(view)
        return live

    async def close(self) -> None:
        await super().close()
        aclose = getattr(self._redis, "aclose", None)
        if aclose is not None:
            await aclose()
