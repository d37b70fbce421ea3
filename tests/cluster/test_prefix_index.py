"""PrefixIndexWriter: block events become exactly the keys cluster/keys.py names."""

import asyncio

import pytest

from cluster import keys
from cluster.memory_store import MemoryRedis, MemoryStore
from cluster.prefix_index import PrefixIndexWriter
from engine.outputs import BlockEvent


class CountingClient:
    """Wraps a client and counts pipeline round trips."""

    def __init__(self, inner):
        self.inner = inner
        self.pipelines = 0

    def pipeline(self, transaction=False):
        outer = self
        pipe = self.inner.pipeline(transaction=transaction)
        real = pipe.execute

        def execute():
            outer.pipelines += 1
            return real()

        pipe.execute = execute
        return pipe

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(params=["redis", "memory"])
def client(request):
    if request.param == "memory":
        return MemoryRedis(MemoryStore())
    return request.getfixturevalue("redis_client")


def bk(h, model="m", ns="baton"):
    return keys.block_key(model, h, ns)


def test_events_to_keys_one_pipeline_each(client):
    c = CountingClient(client)
    w = PrefixIndexWriter(c, "prefill-0", "e1", "m")
    assert w.apply([BlockEvent("stored", [0xA, 0xB, 0xC])]) is True
    assert c.pipelines == 1
    assert client.hgetall(bk(0xA)) == {"prefill-0": "e1"}
    assert bk(0xA) == "baton:blk:m:000000000000000a"
    assert client.smembers(keys.worker_blocks_key("prefill-0")) == {bk(0xA), bk(0xB), bk(0xC)}

    w.apply([BlockEvent("removed", [0xB]), BlockEvent("stored", [0xD])])
    assert c.pipelines == 2
    assert client.exists(bk(0xB)) == 0
    assert client.smembers(keys.worker_blocks_key("prefill-0")) == {bk(0xA), bk(0xC), bk(0xD)}

    other = PrefixIndexWriter(client, "prefill-1", "e9", "m")
    other.apply([BlockEvent("stored", [0xA])])
    w.apply([BlockEvent("cleared"), BlockEvent("stored", [0xE])])
    assert c.pipelines == 3
    assert client.hgetall(bk(0xA)) == {"prefill-1": "e9"}
    assert client.exists(bk(0xC), bk(0xD)) == 0
    assert client.smembers(keys.worker_blocks_key("prefill-0")) == {bk(0xE)}
    assert w.num_blocks == 1


def test_empty_apply_costs_no_round_trip(client):
    c = CountingClient(client)
    w = PrefixIndexWriter(c, "decode-0", "e", "m")
    w.apply([BlockEvent("stored", [1])])
    w.apply([])
    w.apply([])
    assert c.pipelines == 1


def test_drop_all_and_namespace_and_model(client):
    w = PrefixIndexWriter(client, "decode-0", "e", "llama", namespace="t1")
    w.apply([BlockEvent("stored", [1, 2])])
    assert client.hget("t1:blk:llama:0000000000000001", "decode-0") == "e"
    w.drop_all()
    assert client.exists("t1:blk:llama:0000000000000001", "t1:wblk:decode-0") == 0


def test_unknown_event_kind(client):
    with pytest.raises(ValueError, match="kind"):
        PrefixIndexWriter(client, "d", "e", "m").apply([BlockEvent("moved", [1])])


def test_outage_never_raises_and_resyncs_when_redis_returns(redis_server, monkeypatch):
    from cluster import prefix_index
    from cluster.store import connect

    client = connect(redis_server.url)
    w = PrefixIndexWriter(client, "prefill-0", "e1", "m")
    w.apply([BlockEvent("stored", [1, 2, 3])])
    redis_server.stop()
    assert w.apply([BlockEvent("removed", [3]), BlockEvent("stored", [4])]) is False
    assert not w.healthy
    redis_server.start()                       # empty again
    assert w.apply([]) is True and w.healthy
    assert client.smembers(keys.worker_blocks_key("prefill-0")) == {bk(1), bk(2), bk(4)}
    assert client.hget(bk(4), "prefill-0") == "e1"

    # Redis restarts between two steps, no failed call in between: the EXISTS probe notices.
    redis_server.stop()
    redis_server.start()
    monkeypatch.setattr(prefix_index, "CHECK_INTERVAL_S", 0.0)
    assert w.maintain() is True
    assert client.smembers(keys.worker_blocks_key("prefill-0")) == {bk(1), bk(2), bk(4)}
    assert w.num_resyncs == 2


def test_async_writer(redis_server):
    from cluster.store import connect

    async def go():
        client = connect(redis_server.url, asyncio=True)
        w = PrefixIndexWriter(client, "decode-0", "e", "m")
        assert await w.aapply([BlockEvent("stored", [7, 8])])
        assert await w.aapply([BlockEvent("removed", [7])])
        members = await client.smembers(keys.worker_blocks_key("decode-0"))
        await w.adrop_all()
        left = await client.exists(bk(8))
        await client.aclose()
        return members, left

    assert asyncio.run(go()) == ({bk(8)}, 0)
