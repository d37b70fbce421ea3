"""Prefix index readers: how many leading blocks of a prompt each worker holds.

Two implementations, one interface (``PrefixIndex``):

- ``PrefixIndexReader`` reads the Redis index the workers write
  (``cluster.keys``): ``{ns}:blk:{model}:{hash}`` is a hash worker_id → epoch,
  ``{ns}:alive:{worker_id}`` holds the worker's live epoch (with a TTL).
- ``InProcessPrefixIndex`` keeps the same facts in a dict, for ``baton up``
  without redis-server; in-process workers feed it with ``apply``.

Lifecycle of the Redis reader (a small state machine):

    HEALTHY ──Redis error or timeout──▶ DEGRADED: ``match`` returns {} at once
    (route by load alone) and a background probe PINGs Redis with backoff
    (0.25 s, doubling to 10 s) ──PING answered──▶ HEALTHY

``match`` is one round trip: a pipeline of HGETALL per block key, plus — when
the cached live epochs are older than ``epoch_ttl_s`` — one MGET of the alive
keys. An entry counts only if its epoch is the worker's live epoch (a restarted
worker's old entries are ignored; a dead worker has no live epoch). Counting
stops at the first miss per worker. Every call is bounded by ``timeout_s``, so
a hung Redis never stalls the event loop: the request is routed by load alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Iterable, Protocol, Sequence

from cluster import keys

log = logging.getLogger(__name__)


class PrefixIndex(Protocol):
    degraded: bool

    async def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]:
        """worker_id → number of leading ``block_hashes`` the worker holds (0s omitted)."""

    async def close(self) -> None: ...


def count_leading(per_block: Sequence[dict[str, str]], worker_ids: Iterable[str],
                  live_epochs: dict[str, str]) -> dict[str, int]:
    """Leading blocks per worker from per-block ``{worker_id: epoch}`` maps: a block
    counts if the worker's entry carries its live epoch; the first miss ends the run."""
    result: dict[str, int] = {}
    for wid in worker_ids:
        epoch = live_epochs.get(wid)
        if epoch is None:
            continue
        n = 0
        for entries in per_block:
            if entries.get(wid) != epoch:
                break
            n += 1
        if n:
            result[wid] = n
    return result


def connect_async(url: str, timeout_s: float):
    """An asyncio Redis-API client: ``redis.asyncio`` with short timeouts, or for a
    ``memory://`` URL the cluster's in-process store (same commands)."""
    if url.startswith("memory://"):
        from cluster.store import connect

        return connect(url, asyncio=True)
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             decode_responses=True)


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PrefixIndexReader:
    """Reads the Redis prefix index. ``degraded`` is True while Redis is unreachable."""

    def __init__(self, redis_url: str, model: str, namespace: str = keys.DEFAULT_NAMESPACE,
                 timeout_s: float = 0.1, epoch_ttl_s: float = 1.0, max_blocks: int = 1024,
                 backoff_s: tuple[float, float] = (0.25, 10.0), clock=time.monotonic):
        """``backoff_s``: (first, longest) wait between probes while Redis is unreachable."""
        self.model = model
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.epoch_ttl_s = epoch_ttl_s
        self.max_blocks = max_blocks
        self._backoff_min, self._backoff_max = backoff_s
        self._clock = clock
        self._redis = connect_async(redis_url, timeout_s)
        self._epochs: dict[str, str | None] = {}
        self._epochs_at: dict[str, float] = {}
        self.degraded = False
        self.num_errors = 0
        self.num_lookups = 0
        self._probe: asyncio.Task | None = None

    async def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]:
        if not block_hashes or not worker_ids:
            return {}
        if self.degraded:
            return {}
        now = self._clock()
        hashes = list(block_hashes)[:self.max_blocks]
        stale = [w for w in worker_ids if now - self._epochs_at.get(w, -1e18) > self.epoch_ttl_s]
        try:
            replies = await asyncio.wait_for(self._round_trip(hashes, stale), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # redis errors, OSError, timeouts: all mean "no index now"
            self._fail(e)
            return {}
        if stale:
            for wid, epoch in zip(stale, replies[0]):
                self._epochs[wid] = None if epoch is None else _str(epoch)
                self._epochs_at[wid] = now
            replies = replies[1:]
        per_block = [{_str(k): _str(v) for k, v in r.items()} for r in replies]
        live = {w: e for w in worker_ids if (e := self._epochs.get(w)) is not None}
        self.num_lookups += 1
        return count_leading(per_block, worker_ids, live)

    async def _round_trip(self, hashes: list[int], stale: list[str]) -> list:
        pipe = self._redis.pipeline(transaction=False)
        if stale:
            pipe.mget([keys.alive_key(w, self.namespace) for w in stale])
        for h in hashes:
            pipe.hgetall(keys.block_key(self.model, h, self.namespace))
        return await pipe.execute()

    def _fail(self, error: BaseException) -> None:
        self.num_errors += 1
        if self.degraded:
            return
        log.warning("prefix index unreachable (%s: %s); routing by load alone", type(error).__name__, error)
        self.degraded = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover(), name="prefix-index.probe")

    async def _recover(self) -> None:
        """DEGRADED: PING with backoff until Redis answers, then HEALTHY."""
        backoff = self._backoff_min
        while True:
            await asyncio.sleep(backoff)
            try:
                await asyncio.wait_for(self._redis.ping(), self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.num_errors += 1
                backoff = min(backoff * 2, self._backoff_max)
                continue
            self.forget_epochs()
            self.degraded = False
            log.info("prefix index reachable again")
            return

    def forget_epochs(self) -> None:
        """Drop the cached live epochs (next match refreshes them)."""
        self._epochs.clear()
        self._epochs_at.clear()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        aclose = getattr(self._redis, "aclose", None)
        if aclose is not None:
            await aclose()


class InProcessPrefixIndex:
    """The index in a dict, for a cluster without Redis. Same ``match``; workers
    (in this process) call ``set_live`` once and ``apply`` after every engine step.
    Thread-safe: workers apply from their block-event threads while the router reads."""

    degraded = False

    def __init__(self, max_blocks: int = 1024):
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        self._blocks: dict[int, dict[str, str]] = {}
        self._by_worker: dict[str, set[int]] = {}
        self._live: dict[str, str] = {}

    def set_live(self, worker_id: str, epoch: int | str) -> None:
        """The worker (re)started under ``epoch``: entries of older epochs stop counting."""
        with self._lock:
            self._live[worker_id] = str(epoch)

    def remove_worker(self, worker_id: str) -> None:
        """The worker left: forget it and every entry it wrote."""
        with self._lock:
            self._remove(worker_id)

    def _remove(self, worker_id: str) -> None:
        self._live.pop(worker_id, None)
        for h in self._by_worker.pop(worker_id, set()):
            entries = self._blocks.get(h)
            if entries is not None:
                entries.pop(worker_id, None)
                if not entries:
                    del self._blocks[h]

    def apply(self, worker_id: str, epoch: int | str, events) -> None:
        """Apply block events (objects with ``kind`` in stored/removed/cleared and ``block_hashes``)."""
        with self._lock:
            self._apply(worker_id, str(epoch), events)

    def _apply(self, worker_id: str, epoch: str, events) -> None:
        owned = self._by_worker.setdefault(worker_id, set())
        for ev in events:
            if ev.kind == "cleared":
                live = self._live.get(worker_id)
                self._remove(worker_id)
                if live is not None:
                    self._live[worker_id] = live
                owned = self._by_worker.setdefault(worker_id, set())
            elif ev.kind == "stored":
                for h in ev.block_hashes:
                    self._blocks.setdefault(h, {})[worker_id] = epoch
                    owned.add(h)
            elif ev.kind == "removed":
                for h in ev.block_hashes:
                    entries = self._blocks.get(h)
                    if entries is not None and entries.get(worker_id) == epoch:
                        del entries[worker_id]
                        if not entries:
                            del self._blocks[h]
                    owned.discard(h)
            else:
                raise ValueError(f"unknown block event kind {ev.kind!r}")

    async def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> dict[str, int]:
        with self._lock:
            per_block = [self._blocks.get(h, {}) for h in list(block_hashes)[:self.max_blocks]]
            return count_leading(per_block, worker_ids, self._live)

    async def close(self) -> None:
        return None
