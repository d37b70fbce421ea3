"""The in-process store answers like a real Redis for the commands Baton uses."""

import asyncio
import time

import pytest

from cluster.memory_store import AsyncMemoryRedis, MemoryRedis, MemoryStore
from cluster.store import connect


def _script(c):
    out = []
    out.append(c.hset("h", "a", 1))
    out.append(c.hset("h", mapping={"a": "2", "b": "x"}))
    out.append(c.hget("h", "a"))
    out.append([bool(c.hsetnx("h", "a", "3")), bool(c.hsetnx("h", "n", "3")), c.hdel("h", "n")])
    out.append(c.hmget("h", ["a", "zz", "b"]))
    out.append(sorted(c.hgetall("h").items()))
    out.append(c.hdel("h", "a", "zz"))
    out.append(c.hdel("h", "b"))
    out.append(c.exists("h"))                      # emptied hash disappears
    out.append(c.sadd("s", "x", "y", "x"))
    out.append(c.srem("s", "y", "q"))
    out.append(sorted(c.smembers("s")))
    out.append(c.set("k", 5, px=60000))
    out.append(c.mget(["k", "nope"]))
    out.append(c.delete("k", "s", "nope"))
    pipe = c.pipeline(transaction=False)
    pipe.exists("w")
    pipe.hset("w", "x", "1")
    pipe.smembers("nope")
    out.append(pipe.execute())
    return out


def test_memory_store_matches_real_redis(redis_client):
    assert _script(MemoryRedis(MemoryStore())) == _script(redis_client)


def test_expiry():
    c = MemoryRedis(MemoryStore())
    c.set("a", "1", px=50)
    assert c.get("a") == "1"
    time.sleep(0.08)
    assert c.get("a") is None and c.exists("a") == 0


def test_async_client_and_local_url():
    c = connect("memory://", asyncio=True)
    assert isinstance(c, AsyncMemoryRedis)

    async def go():
        pipe = c.pipeline()
        pipe.sadd("t:s", "1")
        pipe.smembers("t:s")
        return await pipe.execute(), await c.scard("t:s")

    assert asyncio.run(go()) == ([1, {"1"}], 1)
    assert connect("memory://").smembers("t:s") == {"1"}   # same process-wide store


def test_bad_url():
    with pytest.raises(ValueError, match="store url"):
        connect("http://localhost")


def test_store_actor_sync_async_and_death(ray_session):
    import ray
    from redis.exceptions import ConnectionError as RedisConnectionError

    from cluster.memory_store import start_store_actor

    actor = start_store_actor("test-store-actor")
    sync = connect("memory://test-store-actor")
    assert sync.hset("h", "w", "e1") == 1
    pipe = sync.pipeline()
    pipe.hget("h", "w")
    pipe.sadd("s", "a")
    assert pipe.execute() == ["e1", 1]

    async def go():
        c = connect("memory://test-store-actor", asyncio=True)
        return await c.hgetall("h")

    assert asyncio.run(go()) == {"w": "e1"}
    ray.kill(actor)
    time.sleep(0.5)
    with pytest.raises(RedisConnectionError):
        sync.get("h")
    with pytest.raises(ValueError, match="no in-process store actor"):
        connect("memory://no-such-store")
