"""PrefixIndexWriter: a worker's block events → the global prefix index.

Lifecycle (one writer per worker start, i.e. per epoch):
1. The worker makes it after registering: ``PrefixIndexWriter(client,
   worker_id, epoch, model, namespace)``.
2. After every engine step it calls ``apply(eng.drain_block_events())`` —
   one pipeline: ``stored`` → ``HSET blk worker_id epoch`` + ``SADD wblk``;
   ``removed`` → ``HDEL`` + ``SREM``; ``cleared`` → every entry of the worker
   dropped. Key patterns: ``cluster/keys.py``.
3. On shutdown ``drop_all()``; the registry's ``deregister`` does the same for
   a worker that died.

Redis trouble: the writer keeps a mirror of the block keys it holds. A failed
``apply`` never raises (serving goes on; the error is logged once per outage)
and marks the writer dirty; the next call that reaches Redis first rewrites
the worker's whole entry set from the mirror (resync). Each pipeline starts
with ``EXISTS wblk``: if the writer holds blocks and the set is gone, Redis
lost its data (restarted empty) and the writer resyncs at once. Calling
``apply([])`` (or ``maintain()``) costs no I/O unless dirty or a second has
passed since the last check, so workers may call it every step or from their
heartbeat and the index heals itself within a second of Redis returning.

Sync (``apply``) and asyncio (``aapply``) variants share the command building;
pass a matching client from ``cluster.store.connect(url, asyncio=...)``. The
sync API is thread-safe (engine thread + heartbeat thread); the asyncio API is
for one event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

from cluster import keys

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
_SADD_BATCH = 512

Command = tuple[str, tuple]


def drop_worker_commands(worker_id: str, block_keys: Iterable[str], ns: str) -> list[Command]:
    """Commands dropping ``worker_id`` from every block key given, and its ``wblk`` set."""
    cmds: list[Command] = [("hdel", (k, worker_id)) for k in block_keys]
    cmds.append(("delete", (keys.worker_blocks_key(worker_id, ns),)))
    return cmds


def run_commands(client: Any, cmds: list[Command]) -> list:
    """One pipeline (no MULTI) with ``cmds``; returns the replies."""
    pipe = client.pipeline(transaction=False)
    for name, args in cmds:
        getattr(pipe, name)(*args)
    return pipe.execute()


async def arun_commands(client: Any, cmds: list[Command]) -> list:
    pipe = client.pipeline(transaction=False)
    for name, args in cmds:
        getattr(pipe, name)(*args)
    return await pipe.execute()


def drop_worker_entries(client: Any, worker_id: str, ns: str = keys.DEFAULT_NAMESPACE) -> int:
    """Remove all of ``worker_id``'s index entries (one read, one pipeline). Returns how many."""
    members = client.smembers(keys.worker_blocks_key(worker_id, ns))
    run_commands(client, drop_worker_commands(worker_id, members, ns))
    return len(members)


class PrefixIndexWriter:
    def __init__(self, client: Any, worker_id: str, epoch: str, model: str,
                 namespace: str = keys.DEFAULT_NAMESPACE) -> None:
        self.client = client
        self.worker_id = worker_id
        self.epoch = str(epoch)
        self.model = model
        self.ns = namespace
        self._wblk = keys.worker_blocks_key(worker_id, namespace)
        self._held: set[str] = set()     # mirror: block keys this worker holds now
        self._dirty = False              # Redis may disagree with the mirror
        self._last_check = 0.0
        self.num_failures = 0
        self.num_resyncs = 0
        self._lock = threading.Lock()    # sync API: engine thread and heartbeat thread

    @property
    def num_blocks(self) -> int:
        return len(self._held)

    @property
    def healthy(self) -> bool:
        return not self._dirty

    # -- building ---------------------------------------------------------
    def _commands(self, events: Iterable) -> list[Command]:
        """Update the mirror and return the write commands for ``events`` (in order)."""
        cmds: list[Command] = []
        for ev in events:
            if ev.kind == "stored":
                ks = [keys.block_key(self.model, h, self.ns) for h in ev.block_hashes]
                if ks:
                    cmds += [("hset", (k, self.worker_id, self.epoch)) for k in ks]
                    cmds.append(("sadd", (self._wblk, *ks)))
                    self._held.update(ks)
            elif ev.kind == "removed":
                ks = [keys.block_key(self.model, h, self.ns) for h in ev.block_hashes]
                if ks:
                    cmds += [("hdel", (k, self.worker_id)) for k in ks]
                    cmds.append(("srem", (self._wblk, *ks)))
                    self._held.difference_update(ks)
            elif ev.kind == "cleared":
                cmds += drop_worker_commands(self.worker_id, self._held, self.ns)
                self._held.clear()
            else:
                raise ValueError(f"unknown block event kind {ev.kind!r}")
        return cmds

    def _resync_commands(self, stale: Iterable[str]) -> list[Command]:
        cmds: list[Command] = [("hdel", (k, self.worker_id)) for k in set(stale) - self._held]
        cmds += [("hset", (k, self.worker_id, self.epoch)) for k in self._held]
        held = list(self._held)
        for i in range(0, len(held), _SADD_BATCH):
            cmds.append(("sadd", (self._wblk, *held[i:i + _SADD_BATCH])))
        return cmds

    def _plan(self, events) -> tuple[list[Command], bool] | None:
        """(commands with EXISTS first, had_blocks) or None when nothing needs doing."""
        had_blocks = bool(self._held)
        cmds = self._commands(events)
        now = time.monotonic()
        if not cmds and not self._dirty and now - self._last_check < CHECK_INTERVAL_S:
            return None
        self._last_check = now
        return [("exists", (self._wblk,)), *cmds], had_blocks

    def _failed(self, e: Exception) -> bool:
        if not self._dirty:
            log.warning("prefix index write failed for %s (%s); serving goes on, will resync", self.worker_id, e)
        self._dirty = True
        self.num_failures += 1
        return False

    def _resynced(self) -> bool:
        self._dirty = False
        self.num_resyncs += 1
        log.info("prefix index resynced for %s (%d blocks)", self.worker_id, len(self._held))
        return True

    # -- sync -------------------------------------------------------------
    def apply(self, events: list) -> bool:
        """Write one step's events. Returns False if Redis could not be reached (never raises on that)."""
        with self._lock:
            return self._apply(events)

    def _apply(self, events: list) -> bool:
        plan = self._plan(events)
        if plan is None:
            return True
        cmds, had_blocks = plan
        try:
            replies = run_commands(self.client, cmds)
            if self._dirty or (had_blocks and not replies[0]):
                stale = self.client.smembers(self._wblk)
                run_commands(self.client, self._resync_commands(stale))
                return self._resynced()
            return True
        except Exception as e:  # redis ConnectionError, TimeoutError, dead store actor
            return self._failed(e)

    def maintain(self) -> bool:
        """Resync if needed (call from a heartbeat when the engine is idle)."""
        return self.apply([])

    def drop_all(self) -> None:
        """Remove every entry of this worker (shutdown). Raises if Redis is unreachable."""
        with self._lock:
            stale = self.client.smembers(self._wblk)
            run_commands(self.client, drop_worker_commands(self.worker_id, set(stale) | self._held, self.ns))
            self._held.clear()
            self._dirty = False

    # -- asyncio ----------------------------------------------------------
    async def aapply(self, events: list) -> bool:
        plan = self._plan(events)
        if plan is None:
            return True
        cmds, had_blocks = plan
        try:
            replies = await arun_commands(self.client, cmds)
            if self._dirty or (had_blocks and not replies[0]):
                stale = await self.client.smembers(self._wblk)
                await arun_commands(self.client, self._resync_commands(stale))
                return self._resynced()
            return True
        except Exception as e:
            return self._failed(e)

    async def amaintain(self) -> bool:
        return await self.aapply([])

    async def adrop_all(self) -> None:
        stale = await self.client.smembers(self._wblk)
        await arun_commands(self.client, drop_worker_commands(self.worker_id, set(stale) | self._held, self.ns))
        self._held.clear()
        self._dirty = False
