"""Registry: which workers exist, which are alive, and how loaded they are.

Lifecycle of a worker in the registry (key patterns in ``cluster/keys.py``):
1. ``register(info)`` when its gRPC server is up — from then on it is routable
   (``list_live``). ``info.epoch`` is new for every worker start (``new_epoch()``).
2. ``heartbeat(info, stats)`` every ``heartbeat_interval_s``: refreshes the
   alive key's TTL, stores the load numbers (``stats_key``) and re-creates the
   ``workers`` entry if it vanished (``HSETNX``: a Redis that restarted empty
   refills itself). ``Heartbeat`` does this (from a thread or an asyncio task).
3. Draining: the controller calls ``set_draining(worker_id)``, which rewrites
   the entry with ``draining=true``; heartbeats never overwrite an existing
   entry, so they cannot undo it. Routers send no new requests to a draining
   worker. (After a Redis restart the controller re-asserts the flag.)
4. ``deregister(worker_id)`` when it leaves or is found dead: drops its entry,
   alive key, stats and every prefix-index entry it wrote.

Every call has an asyncio twin (``a``-prefixed) for a ``redis.asyncio``-style
client (``cluster.store.connect(url, asyncio=True)``).

A worker is live when its alive key holds its current epoch. If the alive key
expires (crash, hang, partition), the worker is dead to routers at once; the
controller deregisters it when it replaces it, and ``reap_dead`` (the
controller, at start and every few seconds) clears entries nobody owns any more
(e.g. a previous cluster's, on a shared Redis).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from cluster import keys
from cluster.config import check_role
from cluster.prefix_index import arun_commands, drop_worker_commands, run_commands

log = logging.getLogger(__name__)

def new_epoch() -> str:
    """A fresh random epoch for one worker start."""
    return secrets.token_hex(8)


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    address: str                    # host:port of the worker's gRPC server
    epoch: str = field(default_factory=new_epoch)
    model: str = ""
    block_size: int = 16
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        check_role(self.role)
        if not self.worker_id or ":" in self.worker_id:
            raise ValueError(f"worker_id must be non-empty without ':', got {self.worker_id!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "WorkerInfo":
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class WorkerRecord:
    """One registry entry as read back: the info, whether it is alive, its last stats."""
    info: WorkerInfo
    alive: bool
    stats: dict = field(default_factory=dict)


class Registry:
    def __init__(self, client: Any, namespace: str = keys.DEFAULT_NAMESPACE, ttl_s: float = 5.0) -> None:
        self.client = client
        self.ns = namespace
        self.ttl_s = ttl_s

    # -- writes -----------------------------------------------------------
    def _commands(self, info: WorkerInfo, stats: dict | None, overwrite: bool) -> list:
        ttl_ms = max(1, int(self.ttl_s * 1000))
        entry = "hset" if overwrite else "hsetnx"
        cmds = [(entry, (keys.workers_key(self.ns), info.worker_id, info.to_json())),
                ("set", (keys.alive_key(info.worker_id, self.ns), info.epoch, None, ttl_ms))]
        if stats is not None:
            cmds.append(("set", (keys.stats_key(info.worker_id, self.ns), json.dumps(stats), None, ttl_ms)))
        return cmds

    def register(self, info: WorkerInfo, stats: dict | None = None) -> None:
        """Write the entry (overwriting an older incarnation's) and mark the worker alive."""
        run_commands(self.client, self._commands(info, stats, overwrite=True))

    def heartbeat(self, info: WorkerInfo, stats: dict | None = None) -> None:
        """Refresh the alive TTL and stats; re-create the entry only if it is missing."""
        run_commands(self.client, self._commands(info, stats, overwrite=False))

    async def aregister(self, info: WorkerInfo, stats: dict | None = None) -> None:
        await arun_commands(self.client, self._commands(info, stats, overwrite=True))

    async def aheartbeat(self, info: WorkerInfo, stats: dict | None = None) -> None:
        await arun_commands(self.client, self._commands(info, stats, overwrite=False))

    def _flagged(self, text: str | None, draining: bool) -> str | None:
        """The entry rewritten with ``draining``, or None if there is nothing to write."""
        if text is None:
            return None
        info = WorkerInfo.from_json(text)
        if info.draining == draining:
            return None
        info.draining = draining
        return info.to_json()

    def set_draining(self, worker_id: str, draining: bool = True) -> bool:
        """Flag (or unflag) a registered worker as draining. False if it is not registered."""
        text = self.client.hget(keys.workers_key(self.ns), worker_id)
        new = self._flagged(text, draining)
        if new is not None:
            self.client.hset(keys.workers_key(self.ns), worker_id, new)
        return text is not None

    async def aset_draining(self, worker_id: str, draining: bool = True) -> bool:
        text = await self.client.hget(keys.workers_key(self.ns), worker_id)
        new = self._flagged(text, draining)
        if new is not None:
            await self.client.hset(keys.workers_key(self.ns), worker_id, new)
        return text is not None

    def _deregister_commands(self, worker_id: str, members) -> list:
        return [("hdel", (keys.workers_key(self.ns), worker_id)),
                ("delete", (keys.alive_key(worker_id, self.ns), keys.stats_key(worker_id, self.ns))),
                *drop_worker_commands(worker_id, members, self.ns)]

    def deregister(self, worker_id: str) -> int:
        """Forget ``worker_id`` and drop its prefix-index entries. Returns how many entries were dropped."""
        members = self.client.smembers(keys.worker_blocks_key(worker_id, self.ns))
        run_commands(self.client, self._deregister_commands(worker_id, members))
        return len(members)

    async def aderegister(self, worker_id: str) -> int:
        members = await self.client.smembers(keys.worker_blocks_key(worker_id, self.ns))
        await arun_commands(self.client, self._deregister_commands(worker_id, members))
        return len(members)

    # -- reads ------------------------------------------------------------
    def _liveness_commands(self, infos: list[WorkerInfo]) -> list:
        ids = [i.worker_id for i in infos]
        return [("mget", ([keys.alive_key(w, self.ns) for w in ids],)),
                ("mget", ([keys.stats_key(w, self.ns) for w in ids],))]

    @staticmethod
    def _records(infos: list[WorkerInfo], epochs: list, stats: list) -> list[WorkerRecord]:
        return [WorkerRecord(info, alive=(epoch == info.epoch), stats=json.loads(st) if st else {})
                for info, epoch, st in zip(infos, epochs, stats)]

    def snapshot(self) -> list[WorkerRecord]:
        """Every registered worker with its liveness and stats (two round trips)."""
        entries = self.client.hgetall(keys.workers_key(self.ns))
        infos = [WorkerInfo.from_json(v) for _, v in sorted(entries.items())]
        if not infos:
            return []
        epochs, stats = run_commands(self.client, self._liveness_commands(infos))
        return self._records(infos, epochs, stats)

    def list_live(self, role: str | None = None) -> list[WorkerInfo]:
        return [r.info for r in self.snapshot() if r.alive and (role is None or r.info.role == role)]

    def reap_dead(self, keep: set[str] = frozenset()) -> list[str]:
        """Deregister every entry whose worker is dead (alive key gone or of another epoch),
        except ``keep``. Returns the ids reaped. A worker that was only late re-registers on
        its next heartbeat and its index writer resyncs (its ``wblk`` set is gone)."""
        dead = [r.info.worker_id for r in self.snapshot() if not r.alive and r.info.worker_id not in keep]
        for wid in dead:
            self.deregister(wid)
        return dead

    async def areap_dead(self, keep: set[str] = frozenset()) -> list[str]:
        dead = [r.info.worker_id for r in await self.asnapshot() if not r.alive and r.info.worker_id not in keep]
        for wid in dead:
            await self.aderegister(wid)
        return dead

    async def asnapshot(self) -> list[WorkerRecord]:
        entries = await self.client.hgetall(keys.workers_key(self.ns))
        infos = [WorkerInfo.from_json(v) for _, v in sorted(entries.items())]
        if not infos:
            return []
        epochs, stats = await arun_commands(self.client, self._liveness_commands(infos))
        return self._records(infos, epochs, stats)


class Heartbeat:
    """One worker's heartbeat, the only one in Baton: a beat is
    ``registry.heartbeat(info, stats_fn())``, then ``writer.maintain()`` if a
    prefix-index writer is given (so the index heals after a Redis outage).
    Errors are logged (once per outage) and retried; the worker keeps serving;
    ``ok`` is the last beat's outcome.

    Two drivers of the same beat:
    - a thread, for a sync registry client: ``start()`` after the first
      ``register``, ``stop()`` before ``deregister`` (tests, live_cluster);
    - an asyncio task, for an asyncio client (``ManagedWorker``):
      ``loop.create_task(hb.run())`` after the first ``aregister``, cancel the
      task before ``aderegister``. There ``stats_fn`` may be a coroutine
      function and ``writer.maintain()`` runs in a thread (it is sync).
    Both wait ``interval_s`` before the first beat (``register`` was one)."""

    def __init__(self, registry: Registry, info: WorkerInfo, interval_s: float = 1.0,
                 stats_fn: Callable[[], Any] | None = None, writer: Any = None) -> None:
        self.registry = registry
        self.info = info
        self.interval_s = interval_s
        self.stats_fn = stats_fn
        self.writer = writer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ok = True

    def _record(self, error: Exception | None) -> bool:
        if error is None:
            if not self.ok:
                log.info("heartbeat for %s restored", self.info.worker_id)
            self.ok = True
        else:
            if self.ok:
                log.warning("heartbeat for %s failed: %s", self.info.worker_id, error)
            self.ok = False
        return self.ok

    def beat(self) -> bool:
        """One beat with a sync registry client."""
        try:
            self.registry.heartbeat(self.info, self.stats_fn() if self.stats_fn else None)
            if self.writer is not None:
                self.writer.maintain()
        except Exception as e:
            return self._record(e)
        return self._record(None)

    async def abeat(self) -> bool:
        """One beat with an asyncio registry client."""
        try:
            stats = self.stats_fn() if self.stats_fn else None
            if inspect.isawaitable(stats):
                stats = await stats
            await self.registry.aheartbeat(self.info, stats)
            if self.writer is not None:
                await asyncio.to_thread(self.writer.maintain)
        except Exception as e:          # the store is down: keep serving, keep trying
            return self._record(e)
        return self._record(None)

    # -- drivers ----------------------------------------------------------
    async def run(self) -> None:
        """``abeat()`` every ``interval_s`` until the task is cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.abeat()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.info.worker_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1.0)
