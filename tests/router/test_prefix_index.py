"""The prefix index as the router reads it: written by the cluster's real writer
and registry into a real redis-server, read back by ``PrefixIndexReader``."""

import asyncio
import time

import pytest

from cluster.prefix_index import PrefixIndexWriter
from cluster.registry import Registry, WorkerInfo
from engine.hashing import hash_blocks
from engine.outputs import BlockEvent
from router.prefix_index import InProcessPrefixIndex, PrefixIndexReader

MODEL = "tiny"
PROMPT = list(range(100, 100 + 16 * 6))          # 6 full blocks of 16
HASHES = hash_blocks(PROMPT, 16)


def worker(redis_client, wid, role="prefill"):
    info = WorkerInfo(wid, role, f"127.0.0.1:{hash(wid) % 1000 + 9000}", model=MODEL)
    Registry(redis_client).register(info)
    return info, PrefixIndexWriter(redis_client, wid, info.epoch, MODEL)


async def test_counts_leading_blocks_per_worker_in_one_round_trip(redis_server, redis_client):
    _, w0 = worker(redis_client, "p0")
    _, w1 = worker(redis_client, "p1")
    w0.apply([BlockEvent("stored", HASHES[:4])])
    w1.apply([BlockEvent("stored", HASHES[:2] + HASHES[3:6])])   # a hole at block 2
    reader = PrefixIndexReader(redis_server.url, MODEL)
    try:
        assert await reader.match(HASHES, ["p0", "p1", "p2"]) == {"p0": 4, "p1": 2}
        assert reader.num_lookups == 1 and not reader.degraded
        # A different prompt sharing only the first block:
        other = hash_blocks(PROMPT[:16] + [7] * 32, 16)
        assert await reader.match(other, ["p0", "p1"]) == {"p0": 1, "p1": 1}
        assert await reader.match([], ["p0"]) == {}
    finally:
        await reader.close()


async def test_removed_blocks_stop_counting(redis_server, redis_client):
    _, w0 = worker(redis_client, "p0")
    w0.apply([BlockEvent("stored", HASHES)])
    w0.apply([BlockEvent("removed", [HASHES[3]])])
    reader = PrefixIndexReader(redis_server.url, MODEL)
    try:
        assert await reader.match(HASHES, ["p0"]) == {"p0": 3}
    finally:
        await reader.close()


async def test_entries_of_a_dead_or_restarted_worker_are_ignored(redis_server, redis_client):
    info, w0 = worker(redis_client, "p0")
    w0.apply([BlockEvent("stored", HASHES)])
    reader = PrefixIndexReader(redis_server.url, MODEL, epoch_ttl_s=0.0)
    try:
        assert await reader.match(HASHES, ["p0"]) == {"p0": 6}
        # The worker restarts: new epoch, old entries still in Redis but stale.
        Registry(redis_client).register(WorkerInfo("p0", "prefill", info.address, model=MODEL))
        assert await reader.match(HASHES, ["p0"]) == {}
        # A worker whose alive key expired is dead.
        _, w1 = worker(redis_client, "p1")
        w1.apply([BlockEvent("stored", HASHES[:2])])
        assert await reader.match(HASHES, ["p1"]) == {"p1": 2}
        redis_client.delete("baton:alive:p1")
        assert await reader.match(HASHES, ["p1"]) == {}
    finally:
        await reader.close()


async def test_live_epochs_are_cached_briefly(redis_server, redis_client):
    _, w0 = worker(redis_client, "p0")
    w0.apply([BlockEvent("stored", HASHES)])
    reader = PrefixIndexReader(redis_server.url, MODEL, epoch_ttl_s=60.0)
    try:
        assert await reader.match(HASHES, ["p0"]) == {"p0": 6}
        redis_client.delete("baton:alive:p0")
        assert await reader.match(HASHES, ["p0"]) == {"p0": 6}   # cached epoch
        reader.forget_epochs()
        assert await reader.match(HASHES, ["p0"]) == {}
    finally:
        await reader.close()


async def test_redis_down_degrades_then_recovers_by_itself(redis_server, redis_client):
    _, w0 = worker(redis_client, "p0")
    w0.apply([BlockEvent("stored", HASHES)])
    reader = PrefixIndexReader(redis_server.url, MODEL, timeout_s=0.2, backoff_s=(0.05, 0.1))
    try:
        assert await reader.match(HASHES, ["p0"]) == {"p0": 6}
        redis_server.stop()
        start = time.monotonic()
        assert await reader.match(HASHES, ["p0"]) == {}
        assert time.monotonic() - start < 0.5                 # never blocks for long
        assert reader.degraded and reader.num_errors == 1
        start = time.monotonic()
        assert await reader.match(HASHES, ["p0"]) == {}       # degraded: answered at once, no Redis call
        assert time.monotonic() - start < 0.01
        await asyncio.sleep(0.3)                              # the background probe keeps failing
        assert reader.degraded and reader.num_errors > 1
        redis_server.start()
        # The restarted Redis is empty; the worker refills it (heartbeat + index resync).
        Registry(redis_client).register(WorkerInfo("p0", "prefill", "x:1", model=MODEL, epoch=w0.epoch))
        PrefixIndexWriter(redis_client, "p0", w0.epoch, MODEL).apply([BlockEvent("stored", HASHES)])
        deadline = time.monotonic() + 2
        while reader.degraded and time.monotonic() < deadline:  # recovers with no lookup needed
            await asyncio.sleep(0.02)
        assert not reader.degraded
        assert await reader.match(HASHES, ["p0"]) == {"p0": 6}
    finally:
        await reader.close()


async def test_a_hung_redis_times_out(redis_server, redis_client):
    reader = PrefixIndexReader(redis_server.url, MODEL, timeout_s=0.1)
    redis_server.proc.send_signal(__import__("signal").SIGSTOP)
    try:
        start = time.monotonic()
        assert await reader.match(HASHES, ["p0"]) == {}
        assert time.monotonic() - start < 0.5
        assert reader.degraded
    finally:
        redis_server.proc.send_signal(__import__("signal").SIGCONT)
        await reader.close()


async def test_the_memory_store_works_the_same(redis_client):
    from cluster.store import connect

    client = connect("memory://")
    client.flushdb()
    info = WorkerInfo("m0", "prefill", "x:1", model=MODEL)
    Registry(client).register(info)
    PrefixIndexWriter(client, "m0", info.epoch, MODEL).apply([BlockEvent("stored", HASHES[:3])])
    reader = PrefixIndexReader("memory://", MODEL)
    assert await reader.match(HASHES, ["m0"]) == {"m0": 3}
    await reader.close()


async def test_in_process_index_has_the_same_semantics():
    index = InProcessPrefixIndex()
    index.set_live("p0", 1)
    index.set_live("p1", 7)
    index.apply("p0", 1, [BlockEvent("stored", HASHES[:5])])
    index.apply("p1", 7, [BlockEvent("stored", HASHES[:2] + HASHES[3:])])
    assert await index.match(HASHES, ["p0", "p1", "p9"]) == {"p0": 5, "p1": 2}
    index.apply("p0", 1, [BlockEvent("removed", [HASHES[1]])])
    assert await index.match(HASHES, ["p0"]) == {"p0": 1}
    index.set_live("p1", 8)                                     # restarted: old epoch ignored
    assert await index.match(HASHES, ["p1"]) == {}
    index.apply("p0", 1, [BlockEvent("cleared")])
    assert await index.match(HASHES, ["p0"]) == {}
    index.apply("p0", 1, [BlockEvent("stored", HASHES[:1])])     # still live after a clear
    assert await index.match(HASHES, ["p0"]) == {"p0": 1}
    index.remove_worker("p0")
    assert await index.match(HASHES, ["p0"]) == {}
    assert not index.degraded
    with pytest.raises(ValueError):
        index.apply("p0", 1, [BlockEvent("moved", [])])
