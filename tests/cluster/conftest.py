"""Fixtures for cluster tests (the private redis-servers are in tests/conftest.py).

``redis_client`` here is ``cluster.store.connect`` on the test's redis-server
(the client every cluster component uses); ``ray_session`` one local Ray.
"""

from __future__ import annotations

import pytest



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
