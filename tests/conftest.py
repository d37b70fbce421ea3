"""Fixtures shared by every test package: real, private redis-servers.

- ``redis_server``: ``redis-server --port <free> --save '' --appendonly no`` per
  test (``cluster.redis_server.RedisServer``), killed on teardown; tests may
  ``stop()`` and ``start()`` it on the same port to simulate an outage.
- ``module_redis``: the same, for a whole module (a launched cluster outlives a test).
- ``redis_client``: a sync ``decode_responses=True`` client on ``redis_server``.
"""

from __future__ import annotations

import contextlib

import pytest

from cluster import redis_server as rs


@contextlib.contextmanager
def _private_redis():
    if not rs.available():
        pytest.skip("redis-server binary not found")
    server = rs.RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server():
    with _private_redis() as server:
        yield server


@pytest.fixture(scope="module")
def module_redis():
    with _private_redis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (GQA) with SmolLM2's tokenizer and chat template, once per session."""
    from tests.helpers.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_tok"), "llama", with_tokenizer=True)
