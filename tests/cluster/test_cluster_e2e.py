"""A whole cluster through launch(): real Ray, real Redis, real workers and router,
a tiny model, requests through the official openai client.

One cluster for the module (1 prefill + 1 decode): the tests run in order —
serving, scaling decode 1→2→1 under a steady stream, a Redis outage.
"""

import re
import threading
import time

import httpx
import pytest

from cluster.config import load_config
from cluster.launcher import launch
from tests.cluster.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def cluster(ray_session, module_redis, tiny_model_dir):
    cfg = load_config(overrides={
        "engine.model": str(tiny_model_dir), "engine.num_kv_blocks": 256, "engine.max_num_seqs": 16,
        "router.port": 0, "router.grpc_port": 0,
        # always disaggregate, so prefill workers and their prefix index are exercised
        "router.options": {"local_prefill_threshold": 0, "directory_refresh_s": 0.5},
        "redis.url": module_redis.url, "redis.heartbeat_interval_s": 0.5, "redis.heartbeat_ttl_s": 3.0,
        "pools.num_cpus": 0.5, "pools.drain_grace_s": 1.5})
    handle = launch(cfg)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    c = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield c
    c.close()


def _metric(cluster, name: str) -> float:
    text = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _health(cluster) -> dict:
    return httpx.get(cluster.http_url + "/health", timeout=10).json()


LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door "
        "and the bird sings a long song about the river, the hills, the trees and the old stone bridge. ")


def test_serves_completions_and_chat(cluster, client, tiny_model_dir):
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="hello there", max_tokens=6, temperature=0)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert _health(cluster)["status"] == "ok"
    st = cluster.state()
    assert {w["worker_id"]: w["status"] for w in st["workers"]} == {"prefill-0": "ready", "decode-0": "ready"}


def test_scaling_decode_under_load_loses_no_request(cluster, client):
    model = client.models.list().data[0].id
    stop = threading.Event()
    done, failures = [], []

    def stream(i):
        n = 0
        while not stop.is_set():
            try:
                r = client.completions.create(model=model, prompt=f"request {i}-{n} about the sea", max_tokens=8,
                                              temperature=0)
                assert r.usage.completion_tokens == 8
                done.append(1)
            except Exception as e:  # recorded, asserted below
                failures.append(repr(e))
            n += 1

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        state = cluster.scale("decode", 2)
        assert sorted(w["worker_id"] for w in state["workers"] if w["role"] == "decode") == ["decode-0", "decode-1"]
        # the new worker joins routing
        assert wait_until(lambda: _routed(cluster, "decode-1") > 0, timeout=20)
        state = cluster.scale("decode", 1)
        assert len([w for w in state["workers"] if w["role"] == "decode"]) == 1
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert len(done) >= 10


def _routed(cluster, worker_id: str) -> float:
    text = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(
        rf'^baton:routed_requests_total{{[^}}]*worker="{worker_id}"[^}}]*}} (\S+)$', text, re.M))


def _hits(cluster) -> float:
    return _metric(cluster, "baton:router_index_hits_tokens_total")


def test_redis_outage_keeps_serving_and_prefix_routing_resumes(cluster, client, module_redis):
    model = client.models.list().data[0].id

    def ask(prompt):
        return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)

    before_prompt = LONG * 2 + "Before the outage."
    ask(before_prompt)
    h0 = _hits(cluster)
    ask(before_prompt)                       # same prompt: the index knows the prefill worker holds it
    assert _hits(cluster) > h0

    def degraded():
        if _health(cluster)["status"] == "degraded":
            return True
        ask("probe")                         # a routed request makes the index reader notice
        return False

    module_redis.stop()
    try:
        assert wait_until(degraded, timeout=15)
        for i in range(4):                   # load-only routing: still served
            r = ask(f"during the outage {i}")
            assert r.usage.completion_tokens == 4
        body = _health(cluster)
        assert body["status"] == "degraded"
    finally:
        module_redis.start()                 # same port, empty

    # workers re-register and resync their index entries; the router recovers
    assert wait_until(lambda: _health(cluster)["status"] == "ok" and ask("after") is not None, timeout=30, every=0.5)
    assert wait_until(lambda: (h := _hits(cluster), ask(before_prompt), _hits(cluster) > h)[-1], timeout=20, every=0.5)
    assert wait_until(lambda: all(w["stats"].get("heartbeat_ok") and w["stats"].get("index_healthy", True)
                                  for w in cluster.state()["workers"]), timeout=10), cluster.state()
