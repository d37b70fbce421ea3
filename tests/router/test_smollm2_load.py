"""SmolLM2-135M through the whole disaggregated path, and load: the official
openai client against a live router in front of real in-process workers (2
prefill, 1 decode), real Redis.

The stories: SmolLM2 answers "What is the capital of France?" with Paris; its
disaggregated greedy output (KV over gRPC) is token-identical to one engine
alone; 64 concurrent streams all complete with the right token counts; 100
streams abandoned mid-way leave no running, held or leaked blocks on any worker.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import openai
import pytest

from engine import LLMEngine, SamplingParams
from protos.gen import serving_pb2 as pb
from protos.gen import serving_pb2_grpc as pb_grpc
from workers.engine_loop import FORWARD_LOCK

from tests.router.live_cluster import LIVE_MODEL, LiveCluster, live_engine_config

OAI_GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def smol_cluster(module_redis):
    # every prompt goes through a prefill worker and a KV transfer (threshold 0)
    cluster = LiveCluster("smollm2-135m", module_redis.url, local_prefill_threshold=0, max_running=256).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def aoai_factory(smol_cluster):
    return lambda: openai.AsyncOpenAI(base_url=smol_cluster.base_url, api_key="none", max_retries=0, timeout=120)


def test_smollm2_answers_paris(smol_cluster):
    oai = openai.OpenAI(base_url=smol_cluster.base_url, api_key="none", max_retries=0, timeout=120)
    r = oai.chat.completions.create(model=LIVE_MODEL, max_tokens=20, temperature=0.0,
                                    messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


def test_smollm2_disaggregated_equals_the_engine_alone(smol_cluster):
    engine = LLMEngine(live_engine_config("smollm2-135m"))
    ids = engine.tokenizer.encode("The history of the Roman Empire begins with the founding of the city")
    with FORWARD_LOCK:
        expected = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    before = smol_cluster.worker_stats()["d0"].prefix_cache_queries
    with grpc.insecure_channel(f"127.0.0.1:{smol_cluster.grpc_port}") as channel:
        r = pb_grpc.ServingStub(channel).Generate(pb.GenerateRequest(
            model=LIVE_MODEL, prompt_token_ids=pb.TokenIds(ids=ids),
            sampling=pb.SamplingParameters(max_tokens=24, temperature=0.0, ignore_eos=True)), timeout=120)
    assert list(r.completions[0].token_ids) == expected.token_ids
    assert r.completions[0].text == expected.text
    assert smol_cluster.worker_stats()["d0"].prefix_cache_queries > before     # the decode worker took it


def test_64_concurrent_streams_complete_with_the_right_token_counts(smol_cluster, aoai_factory):
    async def one(client, i):
        n = 4 + i % 9
        stream = await client.completions.create(
            model=LIVE_MODEL, prompt=f"Request {i}: tell me about the number {i * 7}.", max_tokens=n,
            stream=True, stream_options={"include_usage": True}, **OAI_GREEDY)
        pieces, usage = 0, None
        async for chunk in stream:
            pieces += sum(1 for c in chunk.choices if c.text or c.finish_reason)
            usage = chunk.usage or usage
        return n, usage.completion_tokens, pieces

    async def run():
        client = aoai_factory()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 64
    assert all(got == want for want, got, _ in results), results
    assert all(pieces >= 1 for _, _, pieces in results)


def test_100_streams_abandoned_mid_way_leave_nothing_behind(smol_cluster, aoai_factory):
    async def one(client, i):
        stream = await client.completions.create(
            model=LIVE_MODEL, prompt=f"Story {i}: once upon a time in a village,", max_tokens=400,
            stream=True, **OAI_GREEDY)
        got = 0
        async for chunk in stream:
            got += 1
            if got == 2:
                break                                   # the client goes away mid-stream
        await stream.close()
        return got

    async def run():
        client = aoai_factory()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(100)))
        finally:
            await client.close()

    assert asyncio.run(run()) == [2] * 100
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = smol_cluster.worker_stats()
        if all(s.num_running == s.num_waiting == s.num_held == 0 and s.num_free_blocks == s.num_total_blocks
               for s in stats.values()):
            break
        time.sleep(0.1)
    for wid, s in stats.items():
        assert (s.num_running, s.num_waiting, s.num_held) == (0, 0, 0), (wid, s)
        assert s.num_free_blocks == s.num_total_blocks, (wid, s)      # no leaked block
