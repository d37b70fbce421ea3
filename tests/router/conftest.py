"""Fixtures for router tests.

- ``redis_server`` / ``redis_client`` / ``module_redis``: tests/conftest.py.
- ``tokenizer``: the served model's tokenizer (the embedded SmolLM2 GGUF), once per session.
- ``tiny_model_dir``: tests/conftest.py.
- ``live_redis`` + ``live_cluster``: a real cluster per module (``tests/router/live_cluster.py``).
"""

from __future__ import annotations

import pytest

from tests.router.live_cluster import LiveCluster


@pytest.fixture(scope="session")
def tokenizer():
    from router.tokenizer import RouterTokenizer

    return RouterTokenizer.from_path("smollm2-135m")


@pytest.fixture(scope="module")
def live_redis(module_redis):
    return module_redis


@pytest.fixture(scope="module")
def live_cluster(tiny_model_dir, live_redis):
    cluster = LiveCluster(tiny_model_dir, live_redis.url, local_prefill_threshold=32, max_running=3,
                          max_queue=1).start()
    yield cluster
    cluster.stop()
