"""Fixtures for cluster tests: a real, private redis-server per test.

``redis_server`` yields a started ``cluster.redis_server.RedisServer`` (free
port, no persistence) and kills it on teardown; tests may ``stop()`` and
``start()`` it again on the same port to simulate an outage. ``redis_client``
is a ``decode_responses=True`` client on it.
"""

from __future__ import annotations

import pytest

from cluster import redis_server as rs


@pytest.fixture
def redis_server():
    if not rs.available():
        pytest.skip("redis-server binary not found")
    server = rs.RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server):
    from cluster.store import connect

    client = connect(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for every cluster test (ray.init takes seconds here)."""
    import ray

    from cluster.config import load_config
    from cluster.launcher import init_ray, temp_ray_dir

    started = init_ray(load_config(overrides={"ray.num_cpus": 8, "ray.temp_dir": temp_ray_dir()}))
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def module_redis():
    """A private redis-server for a whole test module (a launched cluster outlives one test)."""
    if not rs.available():
        pytest.skip("redis-server binary not found")
    server = rs.RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (the router tokenizes)."""
    from tests.helpers.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_cluster"), "llama", with_tokenizer=True)
