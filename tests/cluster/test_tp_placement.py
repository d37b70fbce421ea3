"""Tensor-parallel prefill workers in Ray placement groups, on CPU (gloo), with the real controller,
real ``ManagedWorker`` actors and real ``TPRank`` actors: rank 0 is the worker actor in bundle 0,
rank 1 an actor in bundle 1; the KV of a TP=2 prefill reaches a TP=1 decode worker as head shards.
Also: a pool Ray cannot place fails with a clear error, and `--prefill-tp` that cannot shard the model
is refused before Ray starts."""

import asyncio

import pytest
import ray

from cluster import cli
from cluster.config import load_config
from engine import EngineConfig, LLMEngine, SamplingParams
from tests.cluster.helpers import controller_workers, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

_ENGINE = {"engine.num_kv_blocks": 64, "engine.block_size": 4, "engine.max_num_batched_tokens": 64}
PROMPTS = [list(range(7, 20)), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _controller(redis_server, name, model, **overrides):
    from cluster.controller import controller_actor

    cfg = load_config(overrides={"engine.model": str(model), **_ENGINE, "pools.num_cpus": 0.25,
                                 "pools.drain_grace_s": 0.0, "redis.heartbeat_interval_s": 0.5,
                                 "redis.heartbeat_ttl_s": 3.0, **overrides})
    return controller_actor().options(name=name).remote(cfg, redis_server.url)


async def _disaggregated(prefill_address, decode_address):
    from workers.client import WorkerClient

    out = []
    async with WorkerClient(prefill_address) as pc, WorkerClient(decode_address) as dc:
        for i, prompt in enumerate(PROMPTS):
            handle = await pc.prefill(f"tp-{i}", prompt, PARAMS)
            out.append([handle.first_token] + [t async for c in dc.decode(handle, PARAMS) for t in c.token_ids])
    return out


def test_tp2_prefill_worker_in_a_placement_group_matches_tp1(redis_server, tiny_model_dir):
    ctl = _controller(redis_server, "ctl-tp", tiny_model_dir, **{"pools.prefill_tp": 2})
    try:
        ray.get(ctl.start.remote(True, 90))
        workers = controller_workers(ctl)
        prefill, decode = workers["prefill-0"], workers["decode-0"]
        assert (prefill["tp"], decode["tp"]) == (2, 1)
        pg_id = prefill["placement_group"]
        table = ray.util.placement_group_table()
        assert table[pg_id]["state"] == "CREATED" and table[pg_id]["strategy"] == "STRICT_PACK"
        assert table[pg_id]["bundles"] == {0: {"CPU": 0.25}, 1: {"CPU": 0.25}}     # one bundle per rank
        assert table[decode["placement_group"]]["bundles"] == {0: {"CPU": 0.25}}
        free = ray.available_resources()      # both bundles taken: the worker actor (rank 0) and rank 1
        assert free.get(f"CPU_group_0_{pg_id}", 0) == 0 and free.get(f"CPU_group_1_{pg_id}", 0) == 0
        # each rank's process says where it runs (rank 1 answers while it serves): two processes, one node, no GPU
        ranks = ray.get(ray.get(ctl.worker_actor.remote("prefill-0")).placement.remote(), timeout=30)
        assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
        assert {r["node_ip"] for r in ranks} == {ray.util.get_node_ip_address()}
        assert all(r["ray_gpu_ids"] == [] and r["cuda_devices"] == [] for r in ranks)
        assert [r["rank"] for r in ray.get(ray.get(ctl.worker_actor.remote("decode-0")).placement.remote())] == [0]

        tokens = asyncio.run(_disaggregated(prefill["address"], decode["address"]))
        reference = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, block_size=4))
        expected = [o.token_ids for o in reference.generate(PROMPTS, PARAMS)]
        assert tokens == expected

        # a dead TP worker is replaced in a new group; its old group (and rank 1 with it) is removed
        ray.kill(ray.get(ctl.worker_actor.remote("prefill-0")), no_restart=True)
        assert wait_until(lambda: controller_workers(ctl)["prefill-0"]["restarts"] == 1
                          and controller_workers(ctl)["prefill-0"]["status"] == "ready", timeout=60)
        restarted = controller_workers(ctl)["prefill-0"]
        assert restarted["placement_group"] not in ("", pg_id)
        assert ray.util.placement_group_table()[pg_id]["state"] == "REMOVED"
        assert asyncio.run(_disaggregated(restarted["address"], decode["address"])) == expected
        pg_id = restarted["placement_group"]
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)
    table = ray.util.placement_group_table()          # removing the workers removed their groups
    assert table[pg_id]["state"] == "REMOVED" and table[decode["placement_group"]]["state"] == "REMOVED"


def test_unplaceable_pool_fails_with_a_clear_error(redis_server, tiny_model_dir):
    # GPUs on a CPU-only Ray: the groups can never be placed
    ctl = _controller(redis_server, "ctl-nogpu", tiny_model_dir,
                      **{"pools.prefill_tp": 2, "pools.num_gpus": 1, "pools.placement_timeout_s": 1.0,
                         "pools.restart_dead": False})
    try:
        with pytest.raises(RuntimeError, match=r"placement group of (prefill|decode)-0 not placed after 1s") as err:
            ray.get(ctl.start.remote(True, 30))
        assert "'GPU': 1.0" in str(err.value) and "pools.num_gpus" in str(err.value)
        ids = [w["placement_group"] for w in ray.get(ctl.state.remote())["workers"] if w["status"] == "dead"]
        assert ids and all(i == "" for i in ids)                  # released at once, not left pending
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)
    assert not [t for t in ray.util.placement_group_table().values() if t["state"] == "PENDING"]


def test_cli_prefill_tp_that_cannot_shard_the_model_is_refused(tiny_model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BATON_STATE_DIR", str(tmp_path))
    # the tiny model has 4 attention heads and 2 KV heads
    assert cli.main(["up", "--model", str(tiny_model_dir), "--prefill-tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "pools.prefill_tp=3 cannot shard" in err and "num_heads 4 not divisible by tp_size 3" in err
    assert cli.main(["up", "--model", str(tiny_model_dir), "--prefill-tp", "8"]) == 2
    assert "num_heads 4 not divisible by tp_size 8" in capsys.readouterr().err
    assert cli.main(["up", "--prefill-tp", "0"]) == 2
    assert "pools.prefill_tp must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "cluster.json").exists()


def test_check_prefill_tp_reads_only_the_model_config(tiny_model_dir):
    from cluster.tp_launcher import check_prefill_tp, worker_bundles

    cfg = load_config(overrides={"engine.model": str(tiny_model_dir), "pools.prefill_tp": 2})
    check_prefill_tp(cfg)                                   # 4 heads, 2 KV heads: fine
    check_prefill_tp(cfg.replace({"pools.prefill_tp": 4}))  # KV heads replicated (4 % 2 == 0)
    check_prefill_tp(cfg.replace({"engine.model": "dummy:llama3-8b", "pools.prefill_tp": 8}))
    with pytest.raises(ValueError, match="cannot shard dummy:llama3-8b: num_heads 32 not divisible by tp_size 3"):
        check_prefill_tp(cfg.replace({"engine.model": "dummy:llama3-8b", "pools.prefill_tp": 3}))
    with pytest.raises(ValueError, match=r"input size 129 not divisible by tp_size 2 .*intermediate_size=129"):
        check_prefill_tp(cfg.replace({"engine.extra": {"hf_overrides": {"intermediate_size": 129}}}))
    gpu = cfg.replace({"pools.num_gpus": 1, "pools.resources": {"prefill": {"baton_prefill": 1}}})
    assert worker_bundles(gpu.pools, "prefill") == [{"CPU": 0.5, "GPU": 1.0, "baton_prefill": 1.0},
                                                     {"CPU": 0.5, "GPU": 1.0}]
    assert worker_bundles(gpu.pools, "decode") == [{"CPU": 0.5, "GPU": 1.0}]


def test_scaling_down_a_worker_still_waiting_for_resources_removes_it_at_once(redis_server, tiny_model_dir):
    ctl = _controller(redis_server, "ctl-pending", tiny_model_dir,
                      **{"pools.prefill": 0, "pools.decode": 0, "pools.colocated": 2, "pools.num_gpus": 1,
                         "pools.placement_timeout_s": 60.0})
    try:
        ray.get(ctl.start.remote(False))
        pending = {w["worker_id"]: w["placement_group"] for w in ray.get(ctl.state.remote())["workers"]}
        assert len(pending) == 2 and all(pending.values())
        ray.get(ctl.scale.remote("colocated", 1, False))
        assert wait_until(lambda: len(controller_workers(ctl)) == 1, timeout=5)       # not after placement_timeout_s
        (gone,) = set(pending) - set(controller_workers(ctl))
        assert ray.util.placement_group_table()[pending[gone]]["state"] == "REMOVED"
    finally:
        ray.get(ctl.shutdown.remote())
        ray.kill(ctl)
    assert all(ray.util.placement_group_table()[pg]["state"] == "REMOVED" for pg in pending.values())
