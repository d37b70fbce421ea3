import json
import time

import pytest

from cluster import keys
from cluster.memory_store import MemoryRedis, MemoryStore
from cluster.prefix_index import PrefixIndexWriter
from cluster.registry import Heartbeat, Registry, WorkerInfo, new_epoch
from engine.outputs import BlockEvent


@pytest.fixture(params=["redis", "memory"])
def client(request):
    if request.param == "memory":
        return MemoryRedis(MemoryStore())
    return request.getfixturevalue("redis_client")


def _info(wid, role="decode", **kw):
    return WorkerInfo(worker_id=wid, role=role, address=f"127.0.0.1:{5000 + len(wid)}", model="m", **kw)


def test_register_then_heartbeat_expiry_makes_worker_dead(client):
    reg = Registry(client, ttl_s=0.3)
    p, d = _info("prefill-0", "prefill"), _info("decode-0")
    reg.register(p, stats={"num_running": 2})
    reg.register(d)
    assert [i.worker_id for i in reg.list_live()] == ["decode-0", "prefill-0"]
    assert [i.worker_id for i in reg.list_live("prefill")] == ["prefill-0"]
    rec = {r.info.worker_id: r for r in reg.snapshot()}
    assert rec["prefill-0"].stats == {"num_running": 2} and rec["prefill-0"].info.epoch == p.epoch
    for _ in range(4):              # only prefill heartbeats
        time.sleep(0.1)
        reg.heartbeat(p)
    assert [i.worker_id for i in reg.list_live()] == ["prefill-0"]
    assert {r.info.worker_id: r.alive for r in reg.snapshot()} == {"decode-0": False, "prefill-0": True}


def test_epoch_of_a_restarted_worker_replaces_the_old(client):
    reg = Registry(client)
    old = _info("decode-0")
    reg.register(old)
    new = _info("decode-0")
    assert new.epoch != old.epoch and len(new_epoch()) == 16
    reg.register(new)
    assert [i.epoch for i in reg.list_live()] == [new.epoch]
    # a late heartbeat of the old incarnation's alive key would hold the wrong epoch:
    client.set(keys.alive_key("decode-0"), old.epoch)
    assert reg.list_live() == []


def test_draining_survives_heartbeats(client):
    reg = Registry(client)
    d = _info("decode-1")
    reg.register(d)
    assert reg.set_draining("decode-1") is True
    reg.heartbeat(d)
    assert reg.list_live()[0].draining is True
    assert json.loads(client.hget(keys.workers_key(), "decode-1"))["draining"] is True   # what routers read
    reg.set_draining("decode-1", False)
    assert reg.list_live()[0].draining is False


def test_deregister_drops_index_entries(client):
    reg = Registry(client)
    a, b = _info("decode-a"), _info("decode-b")
    reg.register(a)
    reg.register(b)
    wa = PrefixIndexWriter(client, a.worker_id, a.epoch, "m")
    wb = PrefixIndexWriter(client, b.worker_id, b.epoch, "m")
    wa.apply([BlockEvent("stored", [1, 2, 3])])
    wb.apply([BlockEvent("stored", [1])])
    reg.set_draining("decode-a")
    assert reg.deregister("decode-a") == 3
    assert [i.worker_id for i in reg.list_live()] == ["decode-b"]
    assert client.hgetall(keys.block_key("m", 1)) == {"decode-b": b.epoch}
    assert client.exists(keys.block_key("m", 2), keys.block_key("m", 3), keys.worker_blocks_key("decode-a"),
                         keys.alive_key("decode-a")) == 0
    assert reg.set_draining("decode-a") is False


def test_info_validation_and_json_roundtrip():
    i = _info("prefill-3", "prefill", draining=True)
    assert WorkerInfo.from_json(i.to_json()) == i
    with pytest.raises(ValueError, match="role"):
        _info("x", "router")
    with pytest.raises(ValueError, match="worker_id"):
        _info("a:b")


def test_heartbeat_thread_keeps_worker_alive_and_survives_outage(redis_server):
    from cluster.store import connect

    client = connect(redis_server.url)
    reg = Registry(client, ttl_s=0.5)
    info = _info("decode-h")
    reg.register(info)
    hb = Heartbeat(reg, info, interval_s=0.1, stats_fn=lambda: {"num_running": 1}).start()
    try:
        time.sleep(0.8)
        assert [i.worker_id for i in reg.list_live()] == ["decode-h"]
        redis_server.stop()
        time.sleep(0.3)
        assert hb.ok is False
        redis_server.start()          # same port, empty
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not reg_live(client):
            time.sleep(0.05)
        assert [i.worker_id for i in Registry(client).list_live()] == ["decode-h"]
        assert hb.ok is True
    finally:
        hb.stop()


def test_heartbeat_task_is_the_same_beat_on_an_asyncio_client(redis_server):
    import asyncio

    from cluster.store import connect

    async def stats():
        return {"num_running": 2}

    async def go():
        reg = Registry(connect(redis_server.url, asyncio=True), ttl_s=0.5)
        info = _info("decode-a")
        await reg.aregister(info)
        hb = Heartbeat(reg, info, interval_s=0.1, stats_fn=stats)
        task = asyncio.get_running_loop().create_task(hb.run())
        try:
            await asyncio.sleep(0.8)
            (rec,) = await reg.asnapshot()
            assert rec.alive and rec.stats == {"num_running": 2}
            redis_server.stop()
            await asyncio.sleep(0.3)
            assert hb.ok is False
            redis_server.start()          # same port, empty: the next beats refill it
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not hb.ok:
                await asyncio.sleep(0.05)
            assert hb.ok is True
            assert [r.info.worker_id for r in await reg.asnapshot() if r.alive] == ["decode-a"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reg.client.aclose()

    asyncio.run(go())


def reg_live(client):
    try:
        return Registry(client).list_live()
    except Exception:
        return []


def test_async_twins(redis_server):
    import asyncio

    from cluster.store import connect

    async def go():
        reg = Registry(connect(redis_server.url, asyncio=True))
        info = _info("decode-x")
        await reg.aregister(info, {"num_running": 3})
        assert await reg.aset_draining("decode-x") is True
        await reg.aheartbeat(info)
        (rec,) = await reg.asnapshot()
        w = PrefixIndexWriter(connect(redis_server.url), "decode-x", info.epoch, "m")
        w.apply([BlockEvent("stored", [5])])
        dropped = await reg.aderegister("decode-x")
        left = await reg.asnapshot()
        await reg.client.aclose()
        return rec, dropped, left

    rec, dropped, left = asyncio.run(go())
    assert rec.alive and rec.info.draining and rec.stats == {"num_running": 3}
    assert dropped == 1 and left == []


def test_reap_dead_clears_stale_entries(client):
    reg = Registry(client, ttl_s=0.2)
    old, live = _info("decode-old"), _info("decode-live")
    reg.register(old)
    PrefixIndexWriter(client, old.worker_id, old.epoch, "m").apply([BlockEvent("stored", [1])])
    time.sleep(0.3)
    reg.ttl_s = 5.0
    reg.register(live)
    assert reg.reap_dead(keep={"decode-zzz"}) == ["decode-old"]
    assert [r.info.worker_id for r in reg.snapshot()] == ["decode-live"]
    assert client.exists(keys.block_key("m", 1)) == 0
