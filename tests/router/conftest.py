"""Fixtures for router tests.

- ``redis_server``: a real, private ``redis-server --port <free> --save '' --appendonly no``
  per test (``cluster.redis_server.RedisServer``), killed on teardown; tests may
  ``stop()`` and ``start()`` it on the same port to simulate an outage.
- ``redis_client``: a sync ``decode_responses=True`` client on it (to play the workers' side).
- ``tokenizer``: the served model's tokenizer (the embedded SmolLM2 GGUF), once per session.
- ``tiny_model_dir``: a tiny random Llama with SmolLM2's tokenizer, once per session.
- ``live_redis`` + ``live_cluster``: a real cluster per module (``tests/router/live_cluster.py``).
"""

from __future__ import annotations

import pytest

from cluster import redis_server as rs
from tests.helpers.tiny_models import make_tiny_model
from tests.router.live_cluster import LiveCluster


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
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tokenizer():
    from router.tokenizer import RouterTokenizer

    return RouterTokenizer.from_path("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("router_tiny"), "llama", with_tokenizer=True)


@pytest.fixture(scope="module")
def live_redis():
    if not rs.available():
        pytest.skip("redis-server binary not found")
    server = rs.RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_cluster(tiny_model_dir, live_redis):
    cluster = LiveCluster(tiny_model_dir, live_redis.url, local_prefill_threshold=32, max_running=3,
                          max_queue=1).start()
    yield cluster
    cluster.stop()
