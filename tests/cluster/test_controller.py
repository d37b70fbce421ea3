"""Controller with real workers (real Ray, real Redis, ``ManagedWorker`` on a tiny model):
pools start and register, scale up and down, a busy worker drains, a killed worker
restarts under a new epoch, a failed start is reported."""

import asyncio
import re
import threading
import time

import pytest
import ray

from cluster.config import load_config
from cluster.registry import Registry
from cluster.store import connect
from tests.cluster.helpers import controller_workers, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

_CONTEXT = 4096


def _controller(redis_server, name, model, **overrides):
    from cluster.controller import controller_actor

    # the tiny model's 512 positions decode in under 2 s here: stretch its context so one request
    # keeps a worker busy for as long as the test needs (it is aborted well before the end)
    cfg = load_config(overrides={"engine.model": str(model), "engine.num_kv_blocks": 260,
                                 "engine.extra": {"hf_overrides": {"max_position_embeddings": _CONTEXT}},
                                 "engine.max_num_seqs": 4, "pools.num_cpus": 0.25, "pools.drain_grace_s": 0.2,
                                 "redis.heartbeat_interval_s": 0.5, "redis.heartbeat_ttl_s": 3.0, **overrides})
    return controller_actor().options(name=name).remote(cfg, redis_server.url)     # the real worker factory


def _statuses(ctl):
    return {wid: w["status"] for wid, w in controller_workers(ctl).items()}


class _Stream:
    """One long streaming Generate on a worker, consumed by a background thread (its own loop)."""

    def __init__(self, address, request_id, max_tokens):
        self.address, self.request_id, self.max_tokens = address, request_id, max_tokens
        self.tokens = 0
        self.finish_reason = None
        self.error = None
        self._loop = asyncio.new_event_loop()
        self._task = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._consume())
        self._started.set()
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    async def _consume(self):
        from engine.request import SamplingParams
        from workers.client import WorkerClient

        async with WorkerClient(self.address) as client:
            try:
                async for chunk in client.generate(self.request_id, [1, 7, 42, 99, 3],
                                                   SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)):
                    self.tokens += len(chunk.token_ids)
                    if chunk.finish_reason:
                        self.finish_reason = chunk.finish_reason
            except Exception as e:  # asserted by the test
                self.error = e

    def abort(self, timeout=10.0):
        """Cancel the stream (the client cancels the RPC, which aborts the request on the worker)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def _generate(address, max_tokens):
    from engine.request import SamplingParams
    from workers.client import WorkerClient

    async def go():
        async with WorkerClient(address) as client:
            return [c async for c in client.generate("probe", [5, 6, 7], SamplingParams(max_tokens=max_tokens,
                                                                                       ignore_eos=True))]
    return asyncio.run(go())


def test_pools_scale_drain_restart(redis_server, tiny_model_dir):
    reg = Registry(connect(redis_server.url))
    ctl = _controller(redis_server, "ctl-a", tiny_model_dir)
    try:
        state = ray.get(ctl.start.remote(True, 60))
        assert _statuses(ctl) == {"prefill-0": "ready", "decode-0": "ready"}
        assert state["targets"] == {"prefill": 1, "decode": 1, "colocated": 0}
        live = {i.worker_id: i for i in reg.list_live()}
        assert set(live) == {"prefill-0", "decode-0"}
        workers = controller_workers(ctl)
        for wid, info in live.items():        # registered with the address the controller reports
            assert info.address == workers[wid]["address"] and info.model == str(tiny_model_dir)
            assert info.max_model_len == _CONTEXT

        # scale up: new workers are registered (routable) once ready
        ray.get(ctl.scale.remote("decode", 3, True, 60))
        assert {i.worker_id for i in reg.list_live("decode")} == {"decode-0", "decode-1", "decode-2"}

        # scale down removes idle workers first; a busy worker is drained, not killed
        stream = _Stream(controller_workers(ctl)["decode-0"]["address"], "long-0", max_tokens=_CONTEXT - 16)
        try:
            assert wait_until(lambda: stream.tokens > 0 or stream.error, timeout=20) and stream.error is None
            # a stats poll saw it
            assert wait_until(lambda: controller_workers(ctl)["decode-0"]["stats"].get("num_running") == 1)
            ray.get(ctl.scale.remote("decode", 2, False))
            # the newest idle worker goes; the busy one stays
            assert wait_until(lambda: sorted(_statuses(ctl).items()) == [("decode-0", "ready"), ("decode-1", "ready"),
                                                                         ("prefill-0", "ready")]
                              and len(reg.list_live("decode")) == 2, timeout=20)
            assert "decode-0" in _statuses(ctl)

            ray.get(ctl.drain.remote("decode-0", False))
            time.sleep(1.0)                         # past drain_grace_s and a few idle checks
            assert _statuses(ctl)["decode-0"] == "draining"
            assert next(i for i in reg.list_live() if i.worker_id == "decode-0").draining is True
            seen = stream.tokens
            assert wait_until(lambda: stream.tokens > seen)      # still serving its request while draining
            assert stream.finish_reason is None and stream.error is None
        finally:
            stream.abort()
        assert stream.error is None
        assert wait_until(lambda: "decode-0" not in _statuses(ctl), timeout=20)
        assert "decode-0" not in {i.worker_id for i in reg.list_live()}
        assert ray.get(ctl.state.remote())["targets"]["decode"] == 1

        # a killed worker comes back under the same id with a new epoch
        victim = [w for w, s in _statuses(ctl).items() if w.startswith("decode")][0]
        old_epoch = next(i.epoch for i in reg.list_live() if i.worker_id == victim)
        ray.kill(ray.get(ctl.worker_actor.remote(victim)), no_restart=True)
        assert wait_until(lambda: any(w["worker_id"] == victim and w["restarts"] == 1 and w["status"] == "ready"
                                      for w in controller_workers(ctl).values()), timeout=40)
        new = next(i for i in reg.list_live() if i.worker_id == victim)
        assert new.epoch != old_epoch
        assert new.address == controller_workers(ctl)[victim]["address"]
        chunks = _generate(new.address, 3)         # and it serves
        assert sum(len(c.token_ids) for c in chunks) == 3

        # scale up and straight back down: the starting worker is stopped cleanly
        ray.get(ctl.scale.remote("decode", 2, False))
        ray.get(ctl.scale.remote("decode", 1, True, 40))
        assert len(reg.list_live("decode")) == 1
        assert len([w for w in _statuses(ctl) if w.startswith("decode")]) == 1

        with pytest.raises(ValueError, match="need each other"):
            ray.get(ctl.scale.remote("prefill", 0))
        with pytest.raises(ValueError, match="need each other"):
            ray.get(ctl.drain.remote(victim))
        with pytest.raises(ValueError, match="no active worker"):
            ray.get(ctl.drain.remote("decode-9"))
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)
    assert reg.list_live() == []


def test_start_failure_is_reported(redis_server, tmp_path):
    missing = tmp_path / "no-such-model"
    ctl = _controller(redis_server, "ctl-b", missing)
    try:
        with pytest.raises(RuntimeError, match="workers failed to start") as err:
            ray.get(ctl.start.remote(True, 30))
        # the first worker to fail is reported (the other may still be loading)
        assert re.search(r"(prefill-0|decode-0): ValueError: unknown model", str(err.value))
        assert f"unknown model '{missing}'" in str(err.value)
        failed = set()      # each worker fails the same way (restart_dead may respawn one meanwhile)
        assert wait_until(lambda: failed.update(wid for wid, w in controller_workers(ctl).items()
                                                if w["status"] == "dead" and f"unknown model '{missing}'" in w["error"])
                          or failed == {"prefill-0", "decode-0"}, timeout=20)
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)
    assert Registry(connect(redis_server.url)).list_live() == []


def test_launch_failure_cleans_up(tmp_path):
    from cluster.launcher import launch

    cfg = load_config(overrides={"engine.model": str(tmp_path / "no-such-model"), "router.port": 0,
                                 "router.grpc_port": 0, "pools.num_cpus": 0.1})
    with pytest.raises(RuntimeError, match="decode-0|prefill-0") as err:
        launch(cfg, ready_timeout_s=60)
    assert not isinstance(err.value, ray.exceptions.RayError)      # the controller's error, unwrapped
    assert wait_until(lambda: not _actor_exists("baton-controller"))


def _actor_exists(name):
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False
