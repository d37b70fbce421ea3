"""Bad input never reaches a worker: every case is an HTTP 400 with an OpenAI error body.

The real app and tokenizer, with no workers at all: a request that passed
validation would end in 503 (no worker), so a 400 proves it was stopped first.
"""

import json

import httpx
import pytest

from router.config import RouterConfig
from router.directory import StaticWorkerDirectory
from router.server import build_router

MODEL = "tiny-model"


@pytest.fixture
async def client(tokenizer):
    config = RouterConfig(model=MODEL, served_model_aliases=("tiny",), max_model_len=64, max_running=4,
                          grpc_port=0)
    app, grpc_server = build_router(config, tokenizer=tokenizer, directory=StaticWorkerDirectory([]))
    assert grpc_server is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c


def completion(**kw):
    return {"model": MODEL, "prompt": "Hello", **kw}


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], **kw}


def assert_400(r: httpx.Response, param=None, code=None, says=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if says is not None:
        assert says in err["message"], err


async def test_body_that_is_not_json(client):
    r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_400(r, code="invalid_json")
    r = await client.post("/v1/chat/completions", content=b"[1, 2]")
    assert_400(r, code="invalid_json", says="JSON object")


async def test_unknown_or_missing_model(client):
    assert_400(await client.post("/v1/completions", json=completion(model="gpt-9")), "model", "model_not_found")
    assert_400(await client.post("/v1/chat/completions", json={"messages": []}), "model")


@pytest.mark.parametrize("body, param, says", [
    (completion(prompt=""), "prompt", "empty"),
    (completion(prompt=[]), "prompt", "empty"),
    (completion(prompt=[1, 2, 10 ** 7]), "prompt", "vocabulary"),
    (completion(prompt=[1, -3]), "prompt", "vocabulary"),
    (completion(prompt=7), "prompt", None),
    (completion(prompt=[[1, 2], []]), "prompt", "empty"),
])
async def test_bad_prompts(client, body, param, says):
    assert_400(await client.post("/v1/completions", json=body), param, says=says)


async def test_prompt_over_the_context_limit(client):
    r = await client.post("/v1/completions", json=completion(prompt=[5] * 64))
    assert_400(r, "prompt", "context_length_exceeded", "maximum context length is 64")
    r = await client.post("/v1/completions", json=completion(prompt=[5] * 60, max_tokens=5))
    assert_400(r, "max_tokens", "context_length_exceeded", "(60 in the prompt, 5 in the completion)")
    r = await client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "hi " * 80}]))
    assert_400(r, "messages", "context_length_exceeded")


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -4), ("min_p", 2.0), ("n", 0),
    ("max_tokens", 0), ("max_tokens", 2.5), ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
    ("seed", 2 ** 70), ("temperature", "hot"), ("ignore_eos", "yes"),
])
async def test_bad_sampling_values(client, field, value):
    assert_400(await client.post("/v1/completions", json=completion(**{field: value})), field)


@pytest.mark.parametrize("body, param", [
    (completion(echo=True), "echo"),
    (completion(suffix="!"), "suffix"),
    (completion(best_of=3), "best_of"),
    (completion(presence_penalty=0.5), "presence_penalty"),
    (completion(logit_bias={"50": 10}), "logit_bias"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(response_format={"type": "json_object"}), "response_format"),
])
async def test_fields_baton_cannot_honour_are_refused(client, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert_400(await client.post(path, json=body), param)


@pytest.mark.parametrize("body, param", [
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=25), "top_logprobs"),
    (chat(max_completion_tokens=0), "max_tokens"),
])
async def test_bad_chat_requests(client, body, param):
    assert_400(await client.post("/v1/chat/completions", json=body), param)


async def test_more_samples_than_the_router_can_run(client):
    assert_400(await client.post("/v1/completions", json=completion(n=5)), "n")


async def test_a_valid_request_without_workers_is_503_not_400(client):
    r = await client.post("/v1/completions", json=completion(prompt=[1, 2, 3], max_tokens=2))
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    # Streaming: the stream has started, so the error is an event, then [DONE].
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[-2])["error"]["code"] == "no_worker_available"
    assert events[-1] == "[DONE]"


async def test_models_health_metrics_and_unknown_paths(client):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL, "tiny"]
    assert r.json()["data"][0]["max_model_len"] == 64
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert r.json()["prefix_index"] == "ok"
    r = await client.get("/metrics")
    assert r.status_code == 200
    for name in ("baton:time_to_first_token_seconds", "baton:num_requests_running", "baton:prefix_index_degraded",
                 "baton:request_errors_total"):
        assert name in r.text
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
