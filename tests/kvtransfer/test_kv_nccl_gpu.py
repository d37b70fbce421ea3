"""The nccl transport between two GPUs: holder process on cuda:0, receiver (this
process) on cuda:1, NCCL pair groups. Skipped with fewer than 2 GPUs.

Synchronous tests (asyncio.run) so they need no pytest-asyncio.
"""

import asyncio
import time

import pytest
import torch

from kvtransfer import KVHandle, KVLayout
from kvtransfer.base import TransferState
from kvtransfer.nccl import NcclKVReceiver
from kvtransfer.nccl_pairs import PairClient
from tests.kvtransfer.concurrent_pulls import check_concurrent_pulls
from tests.kvtransfer.nccl_holder_proc import HELD_BLOCKS, ShardedSource, make_full_cache, spawned_holder

pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

RX = "cuda:1"


@pytest.fixture(scope="module")
def holder_proc():
    with spawned_holder(120) as call:
        yield call


def handle_for(address, layout):
    return KVHandle("r1", "holder", "127.0.0.1:1", list(HELD_BLOCKS), 15, 42, layout,
                    transport="nccl", transport_address=address)


def pull(endpoint, handle, local, start_block=0):
    async def go():
        rx = NcclKVReceiver(local, nccl_endpoint=endpoint)
        rx.start(handle, start_block)
        await rx.wait(timeout=120)
        return rx
    return asyncio.run(go())


def test_bf16_blocks_arrive_bit_identical_over_nccl(holder_proc):
    address = holder_proc("start", "bf16", torch.bfloat16, 1, "cuda:0")
    full = make_full_cache(torch.bfloat16, RX)
    layout = KVLayout.from_spec(full.spec)
    endpoint = PairClient(RX)
    try:
        for start in (0, 2):
            rx = pull(endpoint, handle_for(address, layout), layout, start)
            assert rx.poll() is TransferState.DONE, rx.error
            assert rx.stats.transport == "nccl" and rx.stats.fallback_reason == ""
            got = rx.result()
            assert got.device == torch.device(RX)
            assert torch.equal(got.view(torch.int16), full.export_blocks(HELD_BLOCKS[start:]).view(torch.int16))
    finally:
        endpoint.close()


def test_tp2_head_shards_merge_over_nccl(holder_proc):
    address = holder_proc("start", "tp2", torch.bfloat16, 2, "cuda:0")
    full = make_full_cache(torch.bfloat16, RX)
    remote, local = ShardedSource(full).layout, KVLayout.from_spec(full.spec)
    endpoint = PairClient(RX)
    try:
        rx = pull(endpoint, handle_for(address, remote), local, 1)
        assert rx.poll() is TransferState.DONE, rx.error
        assert torch.equal(rx.result(), full.export_blocks(HELD_BLOCKS[1:]))
    finally:
        endpoint.close()


def test_pair_communicator_is_built_and_torn_down_at_run_time(holder_proc):
    address = holder_proc("start", "life", torch.float32, 1, "cuda:0")
    layout = KVLayout.from_spec(make_full_cache(torch.float32).spec)
    assert holder_proc("num_pairs", "life") == 0
    endpoint = PairClient(RX)
    t0 = time.perf_counter()
    first = pull(endpoint, handle_for(address, layout), layout)
    build_s = time.perf_counter() - t0
    assert first.poll() is TransferState.DONE, first.error
    assert holder_proc("num_pairs", "life") == 1 and len(endpoint.pairs) == 1
    t0 = time.perf_counter()
    assert pull(endpoint, handle_for(address, layout), layout).poll() is TransferState.DONE
    reuse_s = time.perf_counter() - t0
    print(f"\npair build + first pull {build_s:.3f}s, later pull {reuse_s * 1e3:.2f}ms")
    endpoint.close()
    deadline = time.monotonic() + 20
    while holder_proc("num_pairs", "life") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder_proc("num_pairs", "life") == 0
    again = PairClient(RX)                     # a new decode worker: a new pair, built on demand
    try:
        assert pull(again, handle_for(address, layout), layout).poll() is TransferState.DONE
        assert holder_proc("num_pairs", "life") == 1
    finally:
        again.close()


def test_concurrent_pulls_share_batches_over_nccl(holder_proc):
    address = holder_proc("start", "batches", torch.bfloat16, 1, "cuda:0")
    endpoint = PairClient(RX)
    try:
        asyncio.run(check_concurrent_pulls(endpoint, address, make_full_cache(torch.bfloat16, RX)))
    finally:
        endpoint.close()
