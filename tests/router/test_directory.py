"""The worker set as the router sees it, from the cluster's real registry in a real Redis."""

import time

import pytest

from cluster.registry import Registry, WorkerInfo
from protos.gen import worker_pb2_grpc
from router.directory import RedisWorkerDirectory, StaticWorkerDirectory, WorkerView


def register(redis_client, wid, role, stats=None, **kw):
    info = WorkerInfo(wid, role, f"10.0.0.1:{len(wid) + 7000}", model=kw.pop("model", "tiny"), **kw)
    Registry(redis_client).register(info, stats)
    return info


async def test_live_workers_with_their_load_and_draining_flag(redis_server, redis_client):
    register(redis_client, "p0", "prefill", {"num_running": 1, "num_waiting": 2, "num_free_blocks": 90},
             max_model_len=512, block_size=32)
    register(redis_client, "d0", "decode", {"num_running": 7, "num_free_blocks": 10})
    register(redis_client, "d1", "decode")
    Registry(redis_client).set_draining("d1")
    register(redis_client, "x0", "decode", model="other-model")       # another model's worker
    directory = RedisWorkerDirectory(redis_server.url, model="tiny")
    try:
        await directory.refresh()
        views = {v.worker_id: v for v in directory.views()}
        assert sorted(views) == ["d0", "d1", "p0"]
        assert views["p0"].role == "prefill" and views["p0"].block_size == 32
        assert views["p0"].max_model_len == 512
        assert (views["p0"].stats.num_running, views["p0"].stats.num_waiting,
                views["p0"].stats.num_free_blocks) == (1, 2, 90)
        assert views["d0"].stats.num_running == 7
        assert views["d1"].draining and views["d1"].stats is None
        assert not directory.degraded
    finally:
        await directory.close()


async def test_a_dead_or_restarted_worker_disappears(redis_server, redis_client):
    info = register(redis_client, "d0", "decode")
    register(redis_client, "d1", "decode")
    directory = RedisWorkerDirectory(redis_server.url, model="tiny")
    try:
        await directory.refresh()
        assert [v.worker_id for v in directory.views()] == ["d0", "d1"]
        redis_client.delete("baton:alive:d1")                        # heartbeat TTL expired
        redis_client.set("baton:alive:d0", "another-epoch")          # d0's alive key is a newer start's
        await directory.refresh()
        assert directory.views() == []
        assert info.epoch != "another-epoch"
    finally:
        await directory.close()


async def test_redis_down_keeps_the_last_snapshot(redis_server, redis_client):
    register(redis_client, "d0", "decode")
    directory = RedisWorkerDirectory(redis_server.url, model="tiny", timeout_s=0.2, refresh_s=0.05)
    try:
        await directory.start()                                      # first refresh + background loop
        assert [v.worker_id for v in directory.views()] == ["d0"]
        redis_server.stop()
        start = time.monotonic()
        await directory.refresh()
        assert time.monotonic() - start < 0.5
        assert directory.degraded and [v.worker_id for v in directory.views()] == ["d0"]
    finally:
        await directory.close()


async def test_a_static_list_stays_as_given():
    views = [WorkerView("p0", "prefill", "a:1"), WorkerView("d0", "decode", "b:2", draining=True)]
    directory = StaticWorkerDirectory(views)
    await directory.start()
    assert directory.views() == views and directory.get("d0").draining
    await directory.close()
    with pytest.raises(ValueError):
        StaticWorkerDirectory([views[0], views[0]])
    with pytest.raises(ValueError):
        WorkerView("w", "router", "c:3")


async def test_a_redis_that_restarted_empty_does_not_make_the_workers_vanish(redis_server, redis_client):
    register(redis_client, "d0", "decode")
    directory = RedisWorkerDirectory(redis_server.url, model="tiny", restart_grace_s=0.3)
    try:
        await directory.refresh()
        redis_client.flushall()                     # Redis lost its data; heartbeats refill it within a second
        await directory.refresh()
        assert [v.worker_id for v in directory.views()] == ["d0"]
        register(redis_client, "d1", "decode")      # a heartbeat came back first
        await directory.refresh()
        assert [v.worker_id for v in directory.views()] == ["d1", "d0"]
        time.sleep(0.3)                             # d0 never came back: after the grace it is gone
        await directory.refresh()
        assert [v.worker_id for v in directory.views()] == ["d1"]
    finally:
        await directory.close()


class SlowStats(worker_pb2_grpc.WorkerServicer):
    """A real gRPC worker endpoint whose Stats answers after ``delay_s`` (a busy worker)."""

    delay_s = 0.0

    async def Stats(self, request, context):
        import asyncio
        from protos.gen import worker_pb2 as pb
        await asyncio.sleep(self.delay_s)
        return pb.WorkerStats(num_running=3, num_free_blocks=50, max_model_len=256)


async def test_a_slow_worker_stays_routable_for_a_few_polls_a_dead_one_does_not():
    import grpc
    from router.server import ClientPool

    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(SlowStats(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clients = ClientPool()
    with __import__("socket").socket() as s:            # an address nobody listens on: a dead worker
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    directory = StaticWorkerDirectory([WorkerView("d0", "decode", f"127.0.0.1:{port}"),
                                       WorkerView("d1", "decode", f"127.0.0.1:{dead_port}")],
                                      client_for=clients, stats_timeout_s=0.2, unhealthy_after=3)
    try:
        await directory.refresh()
        d0, d1 = directory.views()
        assert d0.healthy and d0.stats.num_running == 3 and d0.max_model_len == 256
        assert not d1.healthy                             # refused: unhealthy at the first poll
        SlowStats.delay_s = 1.0                           # d0 turns busy: its polls time out
        for missed in (1, 2):
            await directory.refresh()
            d0 = directory.get("d0")
            assert d0.healthy and d0.stats.num_running == 3, missed   # last known load kept
        await directory.refresh()
        assert not directory.get("d0").healthy            # the third timeout in a row
        SlowStats.delay_s = 0.0
        await directory.refresh()
        assert directory.get("d0").healthy
    finally:
        SlowStats.delay_s = 0.0
        await directory.close()
        for c in clients.clients.values():
            await c.close()
        await server.stop(0)
