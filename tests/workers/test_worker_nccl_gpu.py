"""A prefill worker on cuda:0 and a decode worker on cuda:1, KV over the nccl
transport (pair built on the first pull, staged exports, batched pulls): greedy
output token-identical to a colocated engine on the same weights. Skipped with
fewer than 2 GPUs (synchronous tests: the GPU image has no pytest-asyncio)."""

import asyncio

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


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_disaggregated_over_nccl_matches_a_colocated_engine(tiny_model_dir, async_scheduling):
    asyncio.run(disaggregated_over_nccl(tiny_model_dir, async_scheduling))   # no pytest-asyncio needed


async def disaggregated_over_nccl(tiny_model_dir, async_scheduling):
    prompts = [list(range(10 + i, 31 + 3 * i)) for i in range(12)]
    fallbacks_before = dict(FALLBACKS)
    with FORWARD_LOCK:
        expected = LLMEngine(config(tiny_model_dir, device="cuda:0")).generate(prompts, GREEDY)
    prefill = WorkerHost(config(tiny_model_dir, device="cuda:0"), "prefill", worker_id="p-gpu",
                         kv_transport="nccl")
    decode = WorkerHost(config(tiny_model_dir, device="cuda:1", async_scheduling=async_scheduling),
                        "decode", worker_id="d-gpu")
    await decode.start()          # one after the other: a test of the transfer, not of concurrent start-up
    await prefill.start()
    pc, dc = WorkerClient(prefill.address), WorkerClient(decode.address)
    try:
        async def one(i, prompt):
            handle = await pc.prefill(f"r{i}", prompt, GREEDY)
            assert handle.transport == "nccl" and handle.transport_address
            tokens, _ = await collect(dc.decode(handle, GREEDY))
            return [handle.first_token] + tokens
        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))   # concurrent pulls
        assert got == [e.token_ids for e in expected]
        assert prefill.kv_sources["device"].staged.hits > 0                      # staged exports were sent
        assert FALLBACKS == fallbacks_before                                      # every pull went over NCCL
        await assert_no_blocks_in_use(prefill, decode)
    finally:
        await asyncio.gather(pc.close(), dc.close())
        await asyncio.gather(prefill.stop(), decode.stop())
