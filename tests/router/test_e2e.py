"""End to end: the official openai client and a gRPC stub against a live router in
front of real in-process workers (2 prefill, 1 decode; tiny Llama on CPU), with a
real Redis holding the registry and the prefix index.

The stories: a long prompt is prefilled on a prefill worker and decoded on the
decode worker, a short one is prefilled locally, and both give exactly what a
single engine gives; a shared prefix sends the request to the prefill worker
that holds it; streams are framed as OpenAI's; bad input is a 400; a full
queue is a 429; a client that goes away leaves nothing running; a dead prefill
worker is retried around; Redis going away degrades routing, not serving.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine import LLMEngine, SamplingParams
from engine.hashing import hash_blocks
from protos.gen import serving_pb2 as pb
from protos.gen import serving_pb2_grpc as pb_grpc
from workers.engine_loop import FORWARD_LOCK

from tests.router.live_cluster import LIVE_MODEL, free_port, live_engine_config

GREEDY = dict(temperature=0.0, ignore_eos=True)            # gRPC and raw JSON
OAI_GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})   # the openai client's spelling



def assert_workers_idle(cluster, timeout=5.0):
    """Every worker ends with nothing running, waiting or held (no leak)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = cluster.worker_stats()
        idle = all(s.num_running == s.num_waiting == s.num_held == 0 for s in stats.values())
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, stats

def prompt(seed: int, n: int) -> list[int]:
    """n token ids, distinct per seed (so tests do not share prefixes by accident)."""
    return [1000 + (seed * 997 + i * 31) % 40000 for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    engine = LLMEngine(live_engine_config(tiny_model_dir))

    def generate(ids, max_tokens):
        with FORWARD_LOCK:
            out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, **GREEDY))
        return out[0].token_ids

    return generate


@pytest.fixture(scope="module")
def oai(live_cluster):
    return openai.OpenAI(base_url=live_cluster.base_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(live_cluster):
    channel = grpc.insecure_channel(f"127.0.0.1:{live_cluster.grpc_port}")
    yield pb_grpc.ServingStub(channel), channel
    channel.close()


def metric(cluster, name: str, **labels) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.http_port}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def generate(stub, ids, max_tokens=12, **sampling):
    req = pb.GenerateRequest(model=LIVE_MODEL, prompt_token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParameters(max_tokens=max_tokens, **{**GREEDY, **sampling}))
    return stub[0].Generate(req, timeout=60)


def test_disaggregated_and_local_outputs_equal_the_engine_alone(live_cluster, stub, reference):
    for ids, decision in ((prompt(1, 100), "remote"), (prompt(2, 10), "local")):
        before = metric(live_cluster, "baton:disagg_decision_total", decision=decision)
        resp = generate(stub, ids)
        assert list(resp.completions[0].token_ids) == reference(ids, 12), decision
        assert resp.completions[0].finish_reason == "length"
        assert metric(live_cluster, "baton:disagg_decision_total", decision=decision) == before + 1
    for phase in ("router_queue", "routing", "prefill", "prefill_compute", "kv_transfer", "decode_first_token"):
        assert metric(live_cluster, "baton:ttft_phase_seconds_count", phase=phase) >= 1, phase


def test_a_shared_prefix_goes_to_the_prefill_worker_that_holds_it(live_cluster, oai):
    shared = prompt(3, 64)
    first = oai.completions.create(model=LIVE_MODEL, prompt=shared + prompt(4, 64), max_tokens=2, **OAI_GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    holder = max(("p0", "p1"), key=lambda w: metric(live_cluster, "baton:routed_requests_total", worker=w))
    routed = metric(live_cluster, "baton:routed_requests_total", worker=holder)
    time.sleep(0.3)   # the worker's block events reach Redis from a forwarder thread
    # Same 64-token prefix, new 64-token tail: the decode worker lacks the tail (> threshold) → remote,
    # to the prefill worker that already holds the 4 shared blocks.
    second = oai.completions.create(model=LIVE_MODEL, prompt=shared + prompt(5, 64), max_tokens=2, **OAI_GREEDY)
    assert metric(live_cluster, "baton:routed_requests_total", worker=holder) == routed + 1
    assert second.usage.prompt_tokens_details.cached_tokens == 64
    assert second.usage.prompt_tokens == 128 and second.usage.completion_tokens == 2


def test_completions_stream_and_non_stream_agree(oai):
    ids = prompt(6, 40)
    full = oai.completions.create(model=LIVE_MODEL, prompt=ids, max_tokens=10, **OAI_GREEDY)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.usage.prompt_tokens == 40 and full.usage.completion_tokens == 10
    assert full.usage.total_tokens == 50
    chunks = list(oai.completions.create(model=LIVE_MODEL, prompt=ids, max_tokens=10, stream=True,
                                         stream_options={"include_usage": True}, **OAI_GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # A text prompt and a batch of prompts:
    batch = oai.completions.create(model=LIVE_MODEL, prompt=["Hello there", "General Kenobi"], max_tokens=3,
                                   **OAI_GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.completion_tokens == 6


def test_chat_stream_and_non_stream_agree(oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    full = oai.chat.completions.create(model=LIVE_MODEL, messages=messages, max_tokens=8, **OAI_GREEDY)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    chunks = list(oai.chat.completions.create(model=LIVE_MODEL, messages=messages, max_completion_tokens=8,
                                              stream=True, stream_options={"include_usage": True}, **OAI_GREEDY))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_strings_n_seeds_and_logprobs(oai):
    ids = prompt(7, 20)
    full = oai.completions.create(model=LIVE_MODEL, prompt=ids, max_tokens=16, **OAI_GREEDY).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = oai.completions.create(model=LIVE_MODEL, prompt=ids, max_tokens=16, stop=[stop], **OAI_GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.index(stop)]
    # n samples with a seed: different from each other, reproducible as a whole.
    kw = dict(model=LIVE_MODEL, prompt=ids, max_tokens=8, n=2, seed=11, temperature=1.0,
              extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text and a.usage.completion_tokens == 16
    lp = oai.completions.create(model=LIVE_MODEL, prompt=ids, max_tokens=4, logprobs=2, **OAI_GREEDY)
    assert len(lp.choices[0].logprobs.tokens) == 4 and len(lp.choices[0].logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in lp.choices[0].logprobs.top_logprobs)
    chat = oai.chat.completions.create(model=LIVE_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2, **OAI_GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == max(t.logprob for t in content[0].top_logprobs)   # greedy: the top token


def test_disaggregated_logprobs_equal_the_colocated_ones(live_cluster, tokenizer):
    """logprobs=2 on one prompt: through the live router (prefilled remotely; the first token's
    top logprobs come from the prefill worker) and through a router whose only worker is d0
    (colocated): same tokens, same top-2 alternatives, logprobs equal up to float noise."""
    from router.config import RouterConfig
    from router.directory import StaticWorkerDirectory, WorkerView
    from router.server import build_router

    body = {"model": LIVE_MODEL, "prompt": prompt(18, 100), "max_tokens": 4, "logprobs": 2, **GREEDY}
    before = metric(live_cluster, "baton:disagg_decision_total", decision="remote")
    remote = httpx.post(f"{live_cluster.base_url}/completions", json=body, timeout=60).json()
    assert metric(live_cluster, "baton:disagg_decision_total", decision="remote") == before + 1

    async def colocated():
        d0 = live_cluster.hosts["d0"]
        config = RouterConfig(model=LIVE_MODEL, max_model_len=512, grpc_port=0)
        app, _ = build_router(config, tokenizer=tokenizer,
                              directory=StaticWorkerDirectory([WorkerView("d0", "decode", d0.address)]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
            r = await c.post("/v1/completions", json=body)
        text = app.state.router.metrics.render().decode()
        await app.state.router.close()
        return r.json(), text

    local, text = live_cluster.call(colocated())
    assert 'decision="local"' in text and 'decision="remote"' not in text
    a, b = remote["choices"][0]["logprobs"], local["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 4
    assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
    assert [len(top) for top in a["top_logprobs"]] == [2, 2, 2, 2]
    for top_a, top_b in zip(a["top_logprobs"], b["top_logprobs"]):
        assert top_a.keys() == top_b.keys()
        assert list(top_a.values()) == pytest.approx(list(top_b.values()), abs=1e-4)


def test_the_n_samples_of_a_prompt_share_one_hashing(live_cluster, tokenizer):
    """n=3 samples of each of two prompts: each prompt is hashed once (per block size) and its
    hashes shared by its samples, which all complete."""
    from router.config import RouterConfig
    from router.directory import StaticWorkerDirectory, WorkerView
    from router.schemas import CompletionRequest
    from router.server import build_router
    from router.service import Delta

    views = [WorkerView(w, h.role, h.address) for w, h in live_cluster.hosts.items()]
    a, b = prompt(22, 40), prompt(23, 70)

    async def run():
        config = RouterConfig(model=LIVE_MODEL, max_model_len=512, local_prefill_threshold=32, grpc_port=0)
        app, _ = build_router(config, tokenizer=tokenizer, directory=StaticWorkerDirectory(views))
        state = app.state.router
        prepared = await state.service.prepare_completion(CompletionRequest(
            model=LIVE_MODEL, prompt=[a, b], n=3, max_tokens=2, temperature=1.0, seed=5, ignore_eos=True))
        out = [x async for x in state.service.run(prepared)]
        await state.close()
        return prepared, out

    prepared, out = live_cluster.call(run())
    finished = sorted(d.index for d in out if isinstance(d, Delta) and d.finish_reason)
    assert finished == list(range(6)) and out[-1].completion_tokens == 12
    assert prepared.block_hashes == [{16: hash_blocks(a, 16)}, {16: hash_blocks(b, 16)}]


def test_bad_input_is_a_400_with_an_openai_error(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=LIVE_MODEL, prompt=prompt(8, 10), max_tokens=600)
    assert e.value.status_code == 400
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=LIVE_MODEL, prompt="hi", top_p=0.0)
    assert [m.id for m in oai.models.list().data] == [LIVE_MODEL]


def test_grpc_api(live_cluster, stub, reference):
    serving, channel = stub
    ids = prompt(9, 50)
    whole = generate(stub, ids, max_tokens=6)
    pieces = list(serving.GenerateStream(pb.GenerateRequest(
        model=LIVE_MODEL, prompt_token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParameters(max_tokens=6, **GREEDY)), timeout=60))
    assert [t for p in pieces for t in p.token_ids] == list(whole.completions[0].token_ids) == reference(ids, 6)
    assert "".join(p.text for p in pieces) == whole.completions[0].text
    assert pieces[-1].usage.completion_tokens == 6 and whole.usage.prompt_tokens == 50
    chat = serving.Generate(pb.GenerateRequest(model=LIVE_MODEL, chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="hi")]), sampling=pb.SamplingParameters(max_tokens=2)), timeout=60)
    assert len(chat.completions[0].token_ids) == 2
    assert [m.id for m in serving.ListModels(pb.ListModelsRequest()).models] == [LIVE_MODEL]
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for bad in (pb.GenerateRequest(model=LIVE_MODEL, prompt="hi", sampling=pb.SamplingParameters(temperature=-1)),
                pb.GenerateRequest(model="nope", prompt="hi"),
                pb.GenerateRequest(model=LIVE_MODEL)):
        with pytest.raises(grpc.RpcError) as e:
            serving.Generate(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_full_queue_is_429_and_disconnected_clients_leave_nothing_running(live_cluster, oai):
    # The live router runs 3 samples at once and queues 1 more.
    streams = [oai.completions.create(model=LIVE_MODEL, prompt=prompt(10 + i, 8), max_tokens=480, stream=True,
                                      **OAI_GREEDY) for i in range(3)]
    for s in streams:
        next(iter(s))                                       # running: a first token arrived
    queued = oai.completions.create(model=LIVE_MODEL, prompt=prompt(13, 8), max_tokens=4, stream=True, **OAI_GREEDY)
    deadline = time.monotonic() + 5
    while metric(live_cluster, "baton:num_requests_waiting") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        oai.completions.create(model=LIVE_MODEL, prompt=prompt(14, 8), max_tokens=4)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    for s in streams:
        s.close()                                           # the clients go away mid-stream
    assert "".join(c.choices[0].text for c in queued if c.choices) != ""   # the queued one ran
    assert_workers_idle(live_cluster)
    assert metric(live_cluster, "baton:num_requests_running") == 0


def test_a_dead_prefill_worker_is_retried_around_then_prefill_goes_local(live_cluster, reference, tokenizer):
    """A second router whose static worker list names a prefill worker nobody serves ("p-dead",
    sorted first so the policy picks it on a tie), plus the live p1 and d0."""
    from router.config import RouterConfig
    from router.directory import StaticWorkerDirectory, WorkerView
    from router.server import build_router

    dead = WorkerView("p-dead", "prefill", f"127.0.0.1:{free_port()}")
    live = [WorkerView(w, live_cluster.hosts[w].role, live_cluster.hosts[w].address) for w in ("p1", "d0")]
    ids = prompt(15, 80)

    async def ask(workers):
        config = RouterConfig(model=LIVE_MODEL, max_model_len=512, local_prefill_threshold=8, grpc_port=0)
        app, _ = build_router(config, tokenizer=tokenizer, directory=StaticWorkerDirectory(workers))
        state = app.state.router
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
            r = await c.post("/v1/completions", json={"model": LIVE_MODEL, "prompt": ids, "max_tokens": 5,
                                                      **GREEDY})
        await state.close()
        return r, state.metrics.render().decode()

    r, text = live_cluster.call(ask([dead, *live]))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert 'baton:prefill_retries_total{model_name="tiny"} 1.0' in text
    assert 'decision="remote"' in text

    r, text = live_cluster.call(ask([dead, live[1]]))          # no prefill worker answers at all
    assert r.status_code == 200, r.text
    assert 'decision="local",model_name="tiny",reason="prefill_failed"' in text


def test_a_dying_decode_worker_is_retried_before_its_first_token_and_reported_after(
        live_cluster, reference, tokenizer):
    """A second, real decode worker "d-dying" (sorted first, so the policy picks it on a tie) in a
    router's static worker list with p0 and d0. Stopped while it streams a long completion: the
    stream ends with an OpenAI error event and nothing stays held or running. Then, dead but still
    listed, it is picked again and fails before any token: the sample is re-run on d0 and gives
    exactly what one engine gives."""
    import json

    from router.config import RouterConfig
    from router.directory import StaticWorkerDirectory, WorkerView
    from router.server import build_router
    from workers.host import WorkerHost

    long_ids, ids = prompt(24, 40), prompt(25, 80)

    async def run():
        dying = WorkerHost(live_engine_config(live_cluster.model_dir), "decode", worker_id="d-dying")
        await dying.start()
        tasks = []
        try:
            workers = [WorkerView("p0", "prefill", live_cluster.hosts["p0"].address),
                       WorkerView("d-dying", "decode", dying.address),
                       WorkerView("d0", "decode", live_cluster.hosts["d0"].address)]
            config = RouterConfig(model=LIVE_MODEL, max_model_len=512, local_prefill_threshold=8, grpc_port=0)
            app, _ = build_router(config, tokenizer=tokenizer, directory=StaticWorkerDirectory(workers))

            async def stop_mid_stream():
                while (await dying.engine_stats()).num_running == 0:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.1)                  # a few tokens reach the router
                await dying.stop(grace=None)

            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r",
                                         timeout=60) as c:
                stopper = asyncio.create_task(stop_mid_stream())
                tasks.append(stopper)
                cut = await c.post("/v1/completions", json={"model": LIVE_MODEL, "prompt": long_ids,
                                                            "max_tokens": 400, "stream": True, **GREEDY})
                await stopper
                retried = await c.post("/v1/completions", json={"model": LIVE_MODEL, "prompt": ids,
                                                                "max_tokens": 12, **GREEDY})
            await app.state.router.close()
            return cut, retried, app.state.router.metrics.render().decode()
        finally:
            if not (tasks and tasks[0].done()):
                for t in tasks:
                    t.cancel()
                await dying.stop(grace=None)

    cut, retried, text = live_cluster.call(run())
    events = [line[len("data: "):] for line in cut.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_failed" and "tokens were streamed" in error["message"], error
    assert sum(1 for e in events[:-2] if json.loads(e)["choices"][0]["text"]) >= 1
    assert retried.status_code == 200, retried.text
    assert retried.json()["choices"][0]["text"] == tokenizer.decode(reference(ids, 12))
    assert 'baton:decode_retries_total{model_name="tiny"} 1.0' in text
    assert_workers_idle(live_cluster)


def test_without_redis_the_in_process_index_routes_by_prefix(live_cluster, tokenizer):
    """``baton up`` without Redis: a static worker list, and an in-process index the
    workers feed from their block-event hooks."""
    from router.config import RouterConfig
    from router.directory import StaticWorkerDirectory, WorkerView
    from router.prefix_index import InProcessPrefixIndex
    from router.server import build_router

    index = InProcessPrefixIndex()
    for wid, host in live_cluster.hosts.items():
        index.set_live(wid, host.epoch)
        host.loop.add_block_event_hook(lambda events, wid=wid, epoch=host.epoch: index.apply(wid, epoch, events))
    views = [WorkerView(w, h.role, h.address) for w, h in live_cluster.hosts.items()]
    shared = prompt(19, 96)

    async def run():
        config = RouterConfig(model=LIVE_MODEL, max_model_len=512, local_prefill_threshold=32, grpc_port=0)
        app, _ = build_router(config, tokenizer=tokenizer, directory=StaticWorkerDirectory(views), index=index)
        state = app.state.router
        usages = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
            for tail in (20, 21):
                r = await c.post("/v1/completions", json={"model": LIVE_MODEL, "prompt": shared + prompt(tail, 64),
                                                          "max_tokens": 2, **GREEDY})
                usages.append(r.json()["usage"])
                await asyncio.sleep(0.2)              # block events reach the index from a thread
        await state.close()
        return usages, await index.match(hash_blocks(shared, 16), list(live_cluster.hosts))

    usages, held = live_cluster.call(run())
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 96      # sent to the holder
    assert held.get("d0") == 6 and max(held.get("p0", 0), held.get("p1", 0)) == 6


def test_redis_going_away_degrades_routing_not_serving(live_cluster, live_redis, oai):
    health = f"http://127.0.0.1:{live_cluster.http_port}/health"
    assert httpx.get(health).json()["status"] == "ok"
    live_redis.stop()
    try:
        out = oai.completions.create(model=LIVE_MODEL, prompt=prompt(16, 100), max_tokens=3, **OAI_GREEDY)
        assert out.usage.completion_tokens == 3
        body = httpx.get(health).json()
        assert body["status"] == "degraded" and body["prefix_index"] == "degraded"
        assert metric(live_cluster, "baton:prefix_index_degraded") == 1
    finally:
        live_redis.start()
    # The heartbeats re-create the registry; the index reader's backoff expires; all is well again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        oai.completions.create(model=LIVE_MODEL, prompt=prompt(17, 10), max_tokens=1, **OAI_GREEDY)
        if httpx.get(health).json()["status"] == "ok":
            break
        time.sleep(0.2)
    assert httpx.get(health).json()["status"] == "ok"
