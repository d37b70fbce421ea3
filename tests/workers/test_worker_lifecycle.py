"""Worker plumbing: hold TTL, the local transport, block-event hooks, /metrics over HTTP."""

import asyncio
import urllib.request

import pytest

from engine import EngineConfig, SamplingParams
from workers.client import WorkerClient
from workers.errors import WorkerError
from workers.host import WorkerHost

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def config(model_dir, **kw):
    return EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=32, max_num_batched_tokens=64, **kw)


async def test_unpulled_hold_expires_and_metrics_are_served_over_http(tiny_model_dir):
    events = []
    prefill = WorkerHost(config(tiny_model_dir, hold_ttl_s=0.2), "prefill", expire_interval_s=0.05,
                         metrics_port=0, on_block_events=events.extend, redis_url="memory://")
    decode = WorkerHost(config(tiny_model_dir), "decode")
    await asyncio.gather(prefill.start(), decode.start())
    try:
        async with WorkerClient(prefill.address) as pc, WorkerClient(decode.address) as dc:
            handle = await pc.prefill("t", list(range(10, 19)), GREEDY)
            assert (await pc.stats()).num_held == 1
            for _ in range(100):
                if (await pc.stats()).num_expired_holds:
                    break
                await asyncio.sleep(0.02)
            stats = await pc.stats()
            assert stats.num_expired_holds == 1 and stats.num_held == 0
            with pytest.raises(WorkerError, match="NOT_FOUND") as info:
                [c async for c in dc.decode(handle, GREEDY)]
            assert info.value.code == "DATA_LOSS"
            assert (await decode.engine_stats()).num_free_blocks == 32
            # the engine's block events reached the hook and the prefix-index writer
            await asyncio.sleep(0.05)
            assert [h for e in events if e.kind == "stored" for h in e.block_hashes]
            assert prefill.index_writer is not None and prefill.index_writer.num_blocks == 2
            body = urllib.request.urlopen(f"http://127.0.0.1:{stats.metrics_port}/metrics", timeout=5).read()
            assert b'baton:expired_holds_total{role="prefill"' in body
            assert b"baton:request_queue_time_seconds_bucket" in body
    finally:
        await asyncio.gather(prefill.stop(), decode.stop())


async def test_local_transport_between_in_process_workers(tiny_model_dir):
    prefill = WorkerHost(config(tiny_model_dir), "prefill", kv_transport="local")
    decode = WorkerHost(config(tiny_model_dir), "colocated")
    await asyncio.gather(prefill.start(), decode.start())
    try:
        async with WorkerClient(prefill.address) as pc, WorkerClient(decode.address) as dc:
            prompt = list(range(50, 61))
            expected = [c.token_ids async for c in dc.generate("ref", prompt, GREEDY)]
            handle = await pc.prefill("l", prompt, GREEDY)
            assert handle.transport == "local"
            got = [c async for c in dc.decode(handle, GREEDY)]
            assert [handle.first_token] + [t for c in got for t in c.token_ids] == [t for ts in expected for t in ts]
            assert got[0].num_cached_tokens == 8          # the colocated run cached 2 blocks of the prompt
    finally:
        await asyncio.gather(prefill.stop(), decode.stop())
