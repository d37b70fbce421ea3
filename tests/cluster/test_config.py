import pytest

from cluster.config import ClusterConfig, load_config


def test_defaults_are_one_prefill_one_decode_smollm2():
    c = ClusterConfig()
    assert (c.pools.prefill, c.pools.decode, c.pools.colocated) == (1, 1, 0)
    assert c.engine.model == "smollm2-135m"
    assert (c.router.port, c.router.grpc_port) == (8000, 50051)
    assert c.redis.url is None


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pools:\n  prefill: 2\n  decode: 3\nengine:\n  model: dummy:llama3-8b\n  block_size: 32\n"
                 "redis:\n  url: redis://127.0.0.1:1234/0\n")
    c = load_config(f, {"pools.decode": 4, "engine.dtype": None})
    assert (c.pools.prefill, c.pools.decode) == (2, 4)
    assert c.engine.model == "dummy:llama3-8b" and c.engine.block_size == 32
    assert c.engine.dtype == "float32"          # None overrides are skipped (unset CLI flags)
    c2 = load_config(f, ["pools.num_cpus=1", "router.options={policy: load}"])
    assert c2.pools.num_cpus == 1.0 and c2.router.options == {"policy": "load"}
    c3 = load_config(overrides=["pools.resources={prefill: {baton_prefill: 1}, decode: {baton_decode: 1}}"])
    assert c3.pools.resources["decode"] == {"baton_decode": 1}


def test_engine_section_builds_engine_config():
    c = load_config(overrides={"engine.extra": {"seed": 7}, "engine.num_kv_blocks": 64})
    ec = c.engine.to_engine_config(mode="prefill")
    assert ec.mode == "prefill" and ec.seed == 7 and ec.num_kv_blocks == 64


@pytest.mark.parametrize("overrides, message", [
    ({"pools.decode": -1}, "pools.decode"),
    ({"pools.decode": "x"}, "pools.decode must be int"),
    ({"pools.prefill": 0}, "prefill and decode workers come together"),
    ({"pools.prefill_tp": 0}, "pools.prefill_tp must be an integer >= 1"),
    ({"pools.prefill_tp": True}, "pools.prefill_tp must be int"),
    ({"pools.prefill_tp": 2, "engine.device": "cuda", "pools.num_gpus": 0.5}, "whole pools.num_gpus >= 1"),
    ({"engine.extra": {"tensor_parallel_size": 2}}, "set pools.prefill_tp"),
    ({"pools.placement_strategy": "pack"}, "pools.placement_strategy"),
    ({"pools.placement_timeout_s": 0}, "placement_timeout_s"),
    ({"pools.num_cpus": 0}, "must reserve something"),
    ({"engine.block_size": 12}, "power of two"),
    ({"engine.dtype": "int8"}, "dtype"),
    ({"engine.extra": {"nope": 1}}, "unknown EngineConfig fields"),
    ({"redis.url": "http://x"}, "redis.url"),
    ({"redis.heartbeat_ttl_s": 0.5}, "heartbeat"),
    ({"router.port": 70000}, "router.port"),
    ({"router.bogus": 1}, "unknown keys in 'router'"),
    ({"bogus.x": 1}, "SECTION.FIELD"),
    ({"pools.restart_dead": 1}, "must be bool"),
    ({"pools.resources": {"router": {"x": 1}}}, "pools.resources"),
    ({"engine.device": "cuda"}, "pools.num_gpus is 0"),
    ({"engine.device": "cuda:1", "pools.num_gpus": 1}, "engine.device=cuda:1: Ray gives each worker process"),
    ({"pools.kv_transport": "rdma"}, "pools.kv_transport must be one of"),
])
def test_validation_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("pools: [1, 2]\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(f)
    f.write_text("nope: {}\n")
    with pytest.raises(ValueError, match="unknown config sections"):
        load_config(f)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(overrides=["pools.decode"])


def test_colocated_only_pool():
    c = load_config(overrides={"pools.prefill": 0, "pools.decode": 0, "pools.colocated": 2})
    assert c.pools.count("colocated") == 2
    with pytest.raises(ValueError, match="at least one worker"):
        load_config(overrides={"pools.prefill": 0, "pools.decode": 0})


def test_example_config_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "baton.example.yaml"
    cfg = load_config(path)
    assert cfg == ClusterConfig()                 # the example spells out the defaults
    assert cfg.router.options["local_prefill_threshold"] == 256


def test_kv_transport_auto_is_nccl_on_gpus_and_grpc_elsewhere():
    pools = load_config().pools
    assert pools.kv_transport == "auto"
    assert (pools.transport_for("cuda"), pools.transport_for("cuda:0"), pools.transport_for("cpu")) == \
        ("nccl", "nccl", "grpc")
    forced = load_config(overrides={"pools.kv_transport": "grpc"}).pools
    assert forced.transport_for("cuda") == "grpc"
