"""Fixtures for router tests.

- ``redis_server``: a real, private ``redis-server --port <free> --save '' --appendonly no``
  per test (``cluster.redis_server.RedisServer``), killed on teardown; tests may
  ``stop()`` and ``start()`` it on the same port to simulate an outage.
- ``redis_client``: a sync ``decode_responses=True`` client on it (to play the workers' side).
- ``tokenizer``: the served model's tokenizer (the embedded SmolLM2 GGUF), once per session.
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
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tokenizer():
    from router.tokenizer import RouterTokenizer

    return RouterTokenizer.from_path("smollm2-135m")
