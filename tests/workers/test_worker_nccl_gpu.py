"""A prefill worker on cuda:0 (its own process, as in a cluster) and a decode
worker on cuda:1, KV over the nccl transport (pair built on the first pull,
staged exports, batched pulls): greedy output token-identical to a colocated
engine on the same weights. Skipped with fewer than 2 GPUs (synchronous tests:
the GPU image has no pytest-asyncio)."""

import asyncio
import multiprocessing as mp

import pytest
import torch

from engine import LLMEngine
from kvtransfer.nccl import FALLBACKS
from tests.workers.test_worker_disagg import GREEDY, assert_no_blocks_in_use, collect, config
from workers.client import WorkerClient
from workers.engine_loop import FORWARD_LOCK
from workers.host import WorkerHost

pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def prefill_worker_main(model_dir, replies, commands) -> None:
    """The prefill worker's process: serve until told to stop, then report its
    staged-export hits and whether it still holds anything."""
    async def serve():
        host = WorkerHost(config(model_dir, device="cuda:0", num_kv_blocks=512), "prefill", worker_id="p-gpu",
                          kv_transport="nccl")
        replies.put(await host.start())
        await asyncio.to_thread(commands.get)
        stats = await host.engine_stats()
        replies.put((host.kv_sources["device"].staged.hits, stats.num_held))
        await host.stop()
    asyncio.run(serve())


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_disaggregated_over_nccl_matches_a_colocated_engine(tiny_model_dir, async_scheduling):
    prompts = [list(range(10 + i, 31 + 3 * i)) for i in range(12)]
    with FORWARD_LOCK:
        expected = LLMEngine(config(tiny_model_dir, device="cuda:1", num_kv_blocks=512)).generate(prompts, GREEDY)
    ctx = mp.get_context("spawn")
    replies, commands = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=prefill_worker_main, args=(tiny_model_dir, replies, commands), daemon=True)
    proc.start()
    try:
        address = replies.get(timeout=120)
        got, fallbacks = asyncio.run(decode_from(address, tiny_model_dir, async_scheduling, prompts))
        commands.put("stop")
        hits, still_held = replies.get(timeout=60)
    finally:
        commands.put("stop")
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    assert got == [e.token_ids for e in expected]
    assert fallbacks == {} and hits > 0 and still_held == 0   # every pull over NCCL, staged exports sent


async def decode_from(address, model_dir, async_scheduling, prompts):
    before = dict(FALLBACKS)
    decode = WorkerHost(config(model_dir, device="cuda:1", num_kv_blocks=512, async_scheduling=async_scheduling),
                        "decode", worker_id="d-gpu")
    await decode.start()
    pc, dc = WorkerClient(address), WorkerClient(decode.address)
    try:
        async def one(i, prompt):
            handle = await pc.prefill(f"r{i}", prompt, GREEDY)
            assert handle.transport == "nccl" and handle.transport_address
            tokens, _ = await collect(dc.decode(handle, GREEDY))
            return [handle.first_token] + tokens
        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))   # concurrent pulls
        await assert_no_blocks_in_use(decode)
        return got, {k: v - before.get(k, 0) for k, v in FALLBACKS.items() if v != before.get(k, 0)}
    finally:
        await asyncio.gather(pc.close(), dc.close())
        await decode.stop()
