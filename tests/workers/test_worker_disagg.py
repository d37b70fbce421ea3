"""Prefill worker + decode worker in process, KV over real gRPC.

The story: a prompt is prefilled on one worker, its KV pulled by another over
gRPC, and the decode worker's greedy continuation is token-identical to a
single LLMEngine; the decode side reuses its own prefix hits and pulls only
the rest; aborts and failed transfers leave no blocks behind on either side.
"""

import asyncio

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from workers.client import WorkerClient
from workers.engine_loop import FORWARD_LOCK
from workers.errors import WorkerBusy, WorkerError
from workers.host import WorkerHost

BS = 4
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def config(model_dir, **kw):
    return EngineConfig(model=str(model_dir), block_size=BS, num_kv_blocks=kw.pop("num_kv_blocks", 64),
                        max_num_batched_tokens=kw.pop("max_num_batched_tokens", 64), **kw)


class Reference:
    """A single colocated LLMEngine: the oracle. Steps under the workers' forward lock."""

    def __init__(self, model_dir):
        self.engine = LLMEngine(config(model_dir))

    def generate(self, prompts, params):
        with FORWARD_LOCK:
            return self.engine.generate(prompts, params)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
async def pair(tiny_model_dir, request):
    """A prefill and a decode worker; corrupt_chunk[0] = index of a chunk to corrupt in flight.
    The decode worker runs both ways: synchronous steps (the CPU default) and async
    scheduling (the GPU default), where KV imports and aborts land between a step's
    launch and its outputs."""
    corrupt = [None]

    def hook(chunk):
        if chunk.index == corrupt[0]:
            chunk.data = bytes([chunk.data[0] ^ 0x5A]) + chunk.data[1:]

    prefill = WorkerHost(config(tiny_model_dir), "prefill", worker_id="p0",
                         kv_transfer_options={"chunk_hook": hook, "max_chunk_bytes": 4096})
    decode = WorkerHost(config(tiny_model_dir, async_scheduling=request.param), "decode", worker_id="d0")
    await asyncio.gather(prefill.start(), decode.start())
    pc, dc = WorkerClient(prefill.address), WorkerClient(decode.address)
    yield prefill, decode, pc, dc, corrupt
    await asyncio.gather(pc.close(), dc.close())
    await asyncio.gather(prefill.stop(), decode.stop())


async def collect(stream):
    tokens, chunks = [], []
    async for c in stream:
        tokens += c.token_ids
        chunks.append(c)
    return tokens, chunks


async def assert_no_blocks_in_use(*hosts):
    for _ in range(50):          # releases travel asynchronously: give them a moment
        stats = [await h.engine_stats() for h in hosts]
        if all(s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == s.num_held == 0
               for s in stats):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"blocks still in use: {stats}")


async def test_disaggregated_greedy_matches_single_engine(pair, reference):
    prefill, decode, pc, dc, _ = pair
    prompts = [list(range(s, s + n)) for s, n in ((3, 5), (20, 8), (40, 13))]   # partial, exact, partial
    expected = [o.token_ids for o in reference.generate(prompts, GREEDY)]
    for i, prompt in enumerate(prompts):
        handle = await pc.prefill(f"r{i}", prompt, GREEDY)
        assert handle.source_address == prefill.address and handle.num_tokens == len(prompt)
        assert len(handle.block_ids) == -(-len(prompt) // BS) and handle.first_token == expected[i][0]
        tokens, chunks = await collect(dc.decode(handle, GREEDY))
        assert [handle.first_token] + tokens == expected[i]
        assert chunks[-1].finish_reason == "length"
        assert chunks[0].kv_transfer_bytes == len(handle.block_ids) * handle.layout.bytes_per_block
    await assert_no_blocks_in_use(prefill, decode)       # released after the pull, finished on decode
    ps, ds = await pc.stats(), await dc.stats()
    assert ps.kv_transfers == 3 and ds.kv_transfers == 3 and ds.kv_transfer_bytes == ps.kv_transfer_bytes
    assert ps.role == "prefill" and ds.layout == handle.layout
    text = decode.metrics_text()
    assert 'baton:kv_transfer_seconds_count{role="decode",worker="d0"} 3.0' in text
    assert "baton:decode_admission_seconds_bucket" in text and "baton:kv_cache_usage_perc" in text


async def test_decode_side_reuses_its_prefix_and_pulls_only_the_rest(pair, reference):
    prefill, decode, pc, dc, _ = pair
    shared = list(range(40, 52))                                     # 3 full blocks
    a, b = shared + [7, 8], shared + [9, 10, 11, 12, 13]
    expected_b = reference.generate([b], GREEDY)[0].token_ids
    ha = await pc.prefill("a", a, GREEDY)
    await collect(dc.decode(ha, GREEDY))
    hb = await pc.prefill("b", b, GREEDY)
    tokens, chunks = await collect(dc.decode(hb, GREEDY))
    assert [hb.first_token] + tokens == expected_b
    assert chunks[0].num_cached_tokens == 12                          # 3 blocks hit locally
    assert chunks[0].kv_transfer_bytes == 2 * hb.layout.bytes_per_block   # only blocks 3..4 pulled
    # a prompt made only of cached full blocks: cached + pulled blocks cover it exactly
    hs = await pc.prefill("s", shared, GREEDY)
    tokens, chunks = await collect(dc.decode(hs, GREEDY))
    assert [hs.first_token] + tokens == reference.generate([shared], GREEDY)[0].token_ids
    pulled = chunks[0].kv_transfer_bytes // hs.layout.bytes_per_block
    assert chunks[0].num_cached_tokens // BS + pulled == 3 and chunks[0].num_cached_tokens >= 8
    await assert_no_blocks_in_use(prefill)


async def test_abort_mid_stream_frees_everything_on_both_sides(pair):
    prefill, decode, pc, dc, _ = pair
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    handle = await pc.prefill("x", list(range(5, 30)), long)
    stream = dc.decode(handle, long)
    first = await stream.__anext__()
    assert first.token_ids
    assert await dc.abort("x") is True
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    await assert_no_blocks_in_use(prefill, decode)

    # a client that walks away mid-stream aborts the request too
    handle = await pc.prefill("y", list(range(5, 30)), long)
    stream = dc.decode(handle, long)
    await stream.__anext__()
    await stream.aclose()
    # and a prefill abandoned after the handle is freed by Abort on the prefill side
    await pc.prefill("z", list(range(60, 70)), long)
    assert await pc.abort("z") is True
    await assert_no_blocks_in_use(prefill, decode)


async def test_corrupted_chunk_fails_the_request_cleanly(pair, reference):
    prefill, decode, pc, dc, corrupt = pair
    corrupt[0] = 1
    prompt = list(range(100, 140))                                    # 10 blocks → several 4 KiB chunks
    handle = await pc.prefill("c", prompt, GREEDY)
    with pytest.raises(WorkerError, match="checksum mismatch in chunk 1") as info:
        await collect(dc.decode(handle, GREEDY))
    assert info.value.code == "DATA_LOSS"
    await assert_no_blocks_in_use(prefill, decode)                    # nothing imported, hold released
    assert (await dc.stats()).kv_transfer_failures == 1
    corrupt[0] = None                                                 # the worker is still fine
    handle = await pc.prefill("c2", prompt, GREEDY)
    tokens, _ = await collect(dc.decode(handle, GREEDY))
    assert [handle.first_token] + tokens == reference.generate([prompt], GREEDY)[0].token_ids


async def test_pull_and_release_share_one_channel_per_holder(pair, tiny_model_dir):
    prefill, decode, pc, dc, _ = pair
    handle = await pc.prefill("one", list(range(3, 20)), GREEDY)
    await collect(dc.decode(handle, GREEDY))
    await assert_no_blocks_in_use(prefill, decode)                    # released over the pull's channel
    assert prefill.address in decode.channels
    # A holder that leaves: the failed pull's Release finds it gone and its channel is closed.
    gone = WorkerHost(config(tiny_model_dir), "prefill", worker_id="p-gone")
    await gone.start()
    async with WorkerClient(gone.address) as gc:
        first = await gc.prefill("two", list(range(3, 20)), GREEDY)
        handle = await gc.prefill("three", list(range(30, 47)), GREEDY)
    await collect(dc.decode(first, GREEDY))                           # a first pull: the channel is made
    assert gone.address in decode.channels
    await gone.stop()
    with pytest.raises(WorkerError) as info:
        await collect(dc.decode(handle, GREEDY))
    assert info.value.code == "DATA_LOSS"
    for _ in range(50):
        if gone.address not in decode.channels:
            break
        await asyncio.sleep(0.02)
    assert gone.address not in decode.channels and prefill.address in decode.channels
    await assert_no_blocks_in_use(decode)


async def test_generate_runs_locally_with_stop_and_n(pair, reference):
    _, decode, _, dc, _ = pair
    prompt = list(range(3, 16))
    tokens, chunks = await collect(dc.generate("g", prompt, GREEDY))
    assert tokens == reference.generate([prompt], GREEDY)[0].token_ids
    params = SamplingParams(n=2, max_tokens=5, temperature=0.8, seed=1, ignore_eos=True)
    _, chunks = await collect(dc.generate("g2", prompt, params))
    by_index = {i: [t for c in chunks if c.index == i for t in c.token_ids] for i in (0, 1)}
    assert all(len(v) == 5 for v in by_index.values())
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1]
    await assert_no_blocks_in_use(decode)


async def test_bad_input_is_invalid_argument_and_roles_are_enforced(pair):
    prefill, decode, pc, dc, _ = pair
    with pytest.raises(ValueError, match="prompt has"):
        await pc.prefill("big", [1] * 10_000, GREEDY)
    with pytest.raises(ValueError, match="prompt token ids must be integers"):
        await pc.prefill("oov", [1, 2, 100_000], GREEDY)
    bad = SamplingParams(max_tokens=4)
    bad.top_p = 0.0                                                  # bypass client-side validation
    with pytest.raises(ValueError, match="top_p"):
        await collect(dc.generate("bad", [1, 2, 3], bad))
    with pytest.raises(WorkerError) as info:
        await collect(pc.generate("g", [1, 2], GREEDY))                # Generate on a prefill worker
    assert info.value.code == "FAILED_PRECONDITION"
    handle = await pc.prefill("lay", [1, 2, 3, 4, 5], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        await pc.prefill("lay", [1, 2, 3], GREEDY)
    from dataclasses import replace
    with pytest.raises(ValueError, match="block_size"):
        await collect(dc.decode(replace(handle, layout=replace(handle.layout, block_size=8)), GREEDY))
    with pytest.raises(ValueError, match="unknown KV transport 'pigeon'"):
        await collect(dc.decode(replace(handle, transport="pigeon"), GREEDY))
    assert await pc.release("lay")
    assert not await pc.release("lay")
    await assert_no_blocks_in_use(prefill, decode)


async def test_full_queue_is_resource_exhausted(tiny_model_dir):
    host = WorkerHost(config(tiny_model_dir), "colocated", max_waiting=0)
    await host.start()
    try:
        async with WorkerClient(host.address) as c:
            with pytest.raises(WorkerBusy, match="queue is full"):
                await collect(c.generate("q", [1, 2, 3], GREEDY))
            assert (await c.stats()).max_waiting == 0
    finally:
        await host.stop()
