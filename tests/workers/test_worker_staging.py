"""A prefill worker stages the KV of each request it holds (for NCCL pulls): the
staged tensor is the export of the held blocks, and it is dropped with the hold.
(Staging is on by default only on GPUs; forced here on the CPU.)"""

import asyncio

import torch

from tests.workers.test_worker_disagg import GREEDY, config
from workers.client import WorkerClient
from workers.host import WorkerHost


async def wait_for(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def test_held_requests_are_staged_and_dropped_with_the_hold(tiny_model_dir):
    host = WorkerHost(config(tiny_model_dir), "prefill", worker_id="p-stage", kv_stage_bytes=1 << 20)
    await host.start()
    client = WorkerClient(host.address)
    staged = host.kv_sources["device"].staged
    try:
        h1 = await client.prefill("r1", list(range(10, 31)), GREEDY)
        h2 = await client.prefill("r2", list(range(40, 49)), GREEDY)
        assert await wait_for(lambda: "r1" in staged and "r2" in staged)
        exported = await host.loop.call(lambda e: e.export_kv("r1"))
        data = host.kv_sources["device"].take_staged(h1, 0).tensor
        assert torch.equal(data, exported)                        # the held blocks, exactly
        assert "r1" not in staged                                 # a pull takes it once
        assert host.kv_sources["device"].take_staged(h2, 1) is None and "r2" in staged   # not from block 1
        assert await client.release("r2")
        assert await wait_for(lambda: "r2" not in staged)         # dropped with the hold
        assert staged.num_bytes == 0
        assert await client.release("r1")
    finally:
        await client.close()
        await host.stop()


async def test_staging_stays_within_its_budget(tiny_model_dir):
    block_bytes = None
    host = WorkerHost(config(tiny_model_dir), "prefill", worker_id="p-budget", kv_stage_bytes=1)
    await host.start()
    client = WorkerClient(host.address)
    try:
        block_bytes = host.layout.bytes_per_block
        await client.prefill("r1", list(range(10, 31)), GREEDY)
        await asyncio.sleep(0.2)                                  # several loop iterations
        assert len(host.kv_sources["device"].staged) == 0 and block_bytes > 1
        assert await client.release("r1")
    finally:
        await client.close()
        await host.stop()
