"""A cluster without Redis (the in-process store actor), driven through the `baton` CLI too."""

import json

import httpx
import pytest

from cluster import cli
from cluster.config import load_config
from cluster.launcher import launch

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model_dir):
    cfg = load_config(overrides={
        "engine.model": str(tiny_model_dir), "engine.num_kv_blocks": 128, "router.port": 0, "router.grpc_port": 0,
        "router.options": {"local_prefill_threshold": 0, "directory_refresh_s": 0.5},
        "redis.embedded_server": False, "pools.num_cpus": 0.5})
    handle = launch(cfg)
    yield handle
    handle.shutdown()


def test_in_process_store_serves_and_indexes(cluster):
    import openai

    assert cluster.store_kind == "memory" and cluster.store_url == "memory://baton-store"
    client = openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    prompt = "A long shared system prompt about ships, harbours, tides and the weather at sea. " * 3
    for _ in range(2):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    metrics = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("baton:router_index_hits_tokens_total"))
    assert hits > 0                                   # the second request found the first one's blocks
    assert httpx.get(cluster.http_url + "/health", timeout=10).json()["status"] == "ok"


def test_cli_status_and_errors(cluster, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BATON_STATE_DIR", str(tmp_path))
    cli.write_state({"pid": 0, "ray_address": cluster.ray_address, "namespace": "baton",
                     "store_url": cluster.store_url, "http_url": cluster.http_url})
    assert cli.main(["status", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert {w["worker_id"]: w["status"] for w in state["workers"]} == {"prefill-0": "ready", "decode-0": "ready"}
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "prefill-0" in out and "cache hit" in out and "router: ok" in out
    assert cli.main(["scale", "prefill", "0"]) == 2
    assert "need each other" in capsys.readouterr().err
    assert cli.main(["drain", "decode-7"]) == 2
    assert "no active worker" in capsys.readouterr().err


def test_cli_generate(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--max-tokens", "5", "hello"]) == 0
    captured = capsys.readouterr()
    assert "5 generated tokens" in captured.err and "tok/s" in captured.err


def test_cli_up_refuses_bad_config(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BATON_STATE_DIR", str(tmp_path))
    assert cli.main(["up", "--prefill", "0", "--decode", "2"]) == 2
    assert "come together" in capsys.readouterr().err
