"""Controller with fake workers (real Ray, real Redis): pools, scale, drain, restart."""

import time

import pytest
import ray

from cluster.config import load_config
from cluster.registry import Registry
from cluster.store import connect

pytestmark = pytest.mark.usefixtures("ray_session")


def _controller(redis_server, name, **overrides):
    from cluster.controller import controller_actor
    from tests.cluster.fakes import fake_factory

    cfg = load_config(overrides={"engine.model": "fake", "pools.num_cpus": 0.1, "pools.drain_grace_s": 0.2,
                                 "redis.heartbeat_interval_s": 0.2, "redis.heartbeat_ttl_s": 1.0, **overrides})
    return controller_actor().options(name=name).remote(cfg, redis_server.url, fake_factory)


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _statuses(ctl):
    return {w["worker_id"]: w["status"] for w in ray.get(ctl.state.remote())["workers"]}


def test_pools_scale_drain_restart(redis_server):
    reg = Registry(connect(redis_server.url))
    ctl = _controller(redis_server, "ctl-a")
    try:
        state = ray.get(ctl.start.remote(True, 60))
        assert _statuses(ctl) == {"prefill-0": "ready", "decode-0": "ready"}
        assert state["targets"] == {"prefill": 1, "decode": 1, "colocated": 0}
        assert {i.worker_id for i in reg.list_live()} == {"prefill-0", "decode-0"}

        # scale up: new workers are registered (routable) once ready
        ray.get(ctl.scale.remote("decode", 3, True, 60))
        assert {i.worker_id for i in reg.list_live("decode")} == {"decode-0", "decode-1", "decode-2"}

        # scale down removes idle workers first; a busy worker is drained, not killed
        busy = ray.get(ctl.worker_actor.remote("decode-0"))
        ray.get(busy.set_busy.remote(1))
        time.sleep(1.2)                             # one stats poll
        ray.get(ctl.scale.remote("decode", 2, False))
        # the newest idle worker goes; the busy one stays
        assert _wait(lambda: sorted(_statuses(ctl).items()) == [("decode-0", "ready"), ("decode-1", "ready"),
                                                                ("prefill-0", "ready")]
                     and len(reg.list_live("decode")) == 2)
        assert "decode-0" in _statuses(ctl)

        ray.get(ctl.drain.remote("decode-0", False))
        time.sleep(1.0)
        assert _statuses(ctl)["decode-0"] == "draining"
        assert next(i for i in reg.list_live() if i.worker_id == "decode-0").draining is True
        ray.get(busy.set_busy.remote(0))
        assert _wait(lambda: "decode-0" not in _statuses(ctl))
        assert "decode-0" not in {i.worker_id for i in reg.list_live()}
        assert ray.get(ctl.state.remote())["targets"]["decode"] == 1

        # a crashed worker comes back under the same id with a new epoch
        victim = [w for w, s in _statuses(ctl).items() if w.startswith("decode")][0]
        old_epoch = next(i.epoch for i in reg.list_live() if i.worker_id == victim)
        actor = ray.get(ctl.worker_actor.remote(victim))
        actor.crash.remote()
        assert _wait(lambda: any(w["worker_id"] == victim and w["restarts"] == 1 and w["status"] == "ready"
                                 for w in ray.get(ctl.state.remote())["workers"]), timeout=20)
        new = next(i for i in reg.list_live() if i.worker_id == victim)
        assert new.epoch != old_epoch

        # scale up and straight back down: the starting worker is stopped cleanly
        ray.get(ctl.scale.remote("decode", 2, False))
        ray.get(ctl.scale.remote("decode", 1, True, 30))
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


def test_start_failure_is_reported(redis_server):
    ctl = _controller(redis_server, "ctl-b", **{"engine.model": "fail"})
    try:
        with pytest.raises(RuntimeError, match="model failed to load"):
            ray.get(ctl.start.remote(True, 30))
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)


def test_launch_failure_cleans_up(tmp_path):
    from cluster.launcher import launch

    cfg = load_config(overrides={"engine.model": str(tmp_path / "no-such-model"), "router.port": 0,
                                 "router.grpc_port": 0, "pools.num_cpus": 0.1})
    with pytest.raises(RuntimeError, match="decode-0|prefill-0"):
        launch(cfg, ready_timeout_s=60)
    assert _wait(lambda: not _actor_exists("baton-controller"))


def _actor_exists(name):
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False
