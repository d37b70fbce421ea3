"""The nccl transport on CPU: pair groups over gloo between this process (the
decode side) and a spawned holder process (tests/kvtransfer/nccl_holder_proc.py).

The pair machinery is the one NCCL uses on GPUs (store rendezvous, control
socket, one send per pull); only the backend differs.
"""

import asyncio
import time

import pytest
import torch

from kvtransfer import KVHandle, KVLayout
from kvtransfer.base import TransferState
from kvtransfer.nccl import FALLBACKS, NcclKVReceiver
from kvtransfer.nccl_pairs import PairClient
from tests.kvtransfer.concurrent_pulls import check_concurrent_pulls
from tests.kvtransfer.nccl_holder_proc import HELD_BLOCKS, ShardedSource, make_full_cache, spawned_holder


@pytest.fixture(scope="module")
def holder_proc():
    with spawned_holder(60) as call:
        yield call


def handle_for(address: str, layout: KVLayout, num_tokens: int = 15) -> KVHandle:
    return KVHandle("r1", "holder", "127.0.0.1:1", list(HELD_BLOCKS), num_tokens, 42, layout,
                    transport="nccl", transport_address=address)


async def pull(endpoint, handle, local_layout, start_block=0):
    rx = NcclKVReceiver(local_layout, nccl_endpoint=endpoint, allow_gloo=True)
    rx.start(handle, start_block)
    await rx.wait(timeout=60)
    return rx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_blocks_arrive_bit_identical(holder_proc, dtype):
    address = await asyncio.to_thread(holder_proc, "start", f"plain-{dtype}", dtype, 1)
    full = make_full_cache(dtype)
    layout = KVLayout.from_spec(full.spec)
    endpoint = PairClient("cpu")
    try:
        for start in (0, 1):
            rx = await pull(endpoint, handle_for(address, layout), layout, start)
            assert rx.poll() is TransferState.DONE, rx.error
            got = rx.result()
            expected = full.export_blocks(HELD_BLOCKS[start:])
            assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
            assert rx.stats.transport == "nccl" and rx.stats.num_chunks == 1
            assert rx.stats.num_bytes == expected.numel() * expected.element_size()
        assert len(endpoint.pairs) == 1          # one pair, reused
    finally:
        endpoint.close()


async def test_tp2_head_shards_land_in_a_tp1_full_head_cache(holder_proc):
    address = await asyncio.to_thread(holder_proc, "start", "tp2", torch.float32, 2)
    full = make_full_cache(torch.float32)
    remote = ShardedSource(full).layout                 # 1 head per rank, tp_size 2
    local = KVLayout.from_spec(full.spec)               # 2 heads, tp_size 1
    assert (remote.num_kv_heads, remote.tp_size, local.num_kv_heads) == (1, 2, 2)
    endpoint = PairClient("cpu")
    try:
        rx = await pull(endpoint, handle_for(address, remote), local, start_block=1)
        assert rx.poll() is TransferState.DONE, rx.error
        assert torch.equal(rx.result(), full.export_blocks(HELD_BLOCKS[1:]))
    finally:
        endpoint.close()


async def _wait_for(fn, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (value := await asyncio.to_thread(fn)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


async def test_pairs_are_built_on_demand_and_torn_down_alone(holder_proc):
    layout = KVLayout.from_spec(make_full_cache(torch.float32).spec)
    a = await asyncio.to_thread(holder_proc, "start", "A", torch.float32, 1)
    b = await asyncio.to_thread(holder_proc, "start", "B", torch.float32, 1)
    assert await asyncio.to_thread(holder_proc, "num_pairs", "A") == 0      # nothing before a pull
    decode1, decode2 = PairClient("cpu", "decode-1"), PairClient("cpu", "decode-2")
    try:
        for ep, addr in ((decode1, a), (decode1, b), (decode2, b)):
            assert (await pull(ep, handle_for(addr, layout), layout)).poll() is TransferState.DONE
        assert await asyncio.to_thread(holder_proc, "num_pairs", "A") == 1
        assert await asyncio.to_thread(holder_proc, "num_pairs", "B") == 2
        # holder A leaves: decode-1's pair with A breaks at its next use; its pair with B is untouched
        assert await asyncio.to_thread(holder_proc, "close", "A")
        rx = await pull(decode1, handle_for(a, layout), layout)
        assert rx.poll() is TransferState.FAILED and a not in decode1.pairs
        assert (await pull(decode1, handle_for(b, layout), layout)).poll() is TransferState.DONE
        # decode-2 leaves: B drops that pair only, and decode-1 goes on pulling from B
        decode2.close()
        assert await _wait_for(lambda: holder_proc("num_pairs", "B"), 1) == 1
        assert (await pull(decode1, handle_for(b, layout), layout)).poll() is TransferState.DONE
    finally:
        decode1.close()
        decode2.close()
    assert await _wait_for(lambda: holder_proc("num_pairs", "B"), 0) == 0


async def test_holder_errors_fail_the_pull_and_keep_the_pair(holder_proc):
    address = await asyncio.to_thread(holder_proc, "start", "errs", torch.float32, 1)
    layout = KVLayout.from_spec(make_full_cache(torch.float32).spec)
    endpoint = PairClient("cpu")
    try:
        missing = handle_for(address, layout)
        missing.request_id = "nobody"
        rx = await pull(endpoint, missing, layout)
        assert rx.poll() is TransferState.FAILED and "no KV held" in rx.error
        stale = handle_for(address, layout)
        stale.block_ids = [1, 2, 3, 4]
        rx = await pull(endpoint, stale, layout)
        assert rx.poll() is TransferState.FAILED and "holds blocks" in rx.error
        assert (await pull(endpoint, handle_for(address, layout), layout)).poll() is TransferState.DONE
        assert len(endpoint.pairs) == 1
    finally:
        endpoint.close()


async def test_without_an_nccl_path_the_pull_falls_back_to_grpc():
    from tests.kvtransfer.test_kv_grpc_transport import Holder, make_cache
    src, dst = make_cache(), make_cache(fill=False)
    layout = KVLayout.from_spec(dst.spec)
    async with Holder(src) as holder:
        h = holder.handle("r1", [5, 2, 11], num_tokens=12)
        h.transport = "nccl"                        # but the holder advertised no transport_address
        before = FALLBACKS.get("holder_without_nccl", 0)
        rx = NcclKVReceiver(layout, nccl_endpoint=PairClient("cpu"))
        rx.start(h)
        assert await rx.wait(timeout=10) is TransferState.DONE, rx.error
        assert (rx.stats.transport, rx.stats.fallback_reason) == ("grpc", "holder_without_nccl")
        assert FALLBACKS["holder_without_nccl"] == before + 1
        h.transport_address = "127.0.0.1:9"        # a store, but this receiver has no GPU
        rx = NcclKVReceiver(layout, nccl_endpoint=PairClient("cpu"))
        rx.start(h)
        assert await rx.wait(timeout=10) is TransferState.DONE, rx.error
        assert rx.stats.fallback_reason == "no_gpu"
    assert torch.equal(rx.result(), src.export_blocks([5, 2, 11]))



async def test_concurrent_pulls_share_batches_and_each_gets_its_own_blocks(holder_proc):
    address = await asyncio.to_thread(holder_proc, "start", "batches", torch.bfloat16, 1)
    endpoint = PairClient("cpu")
    try:
        await check_concurrent_pulls(endpoint, address, make_full_cache(torch.bfloat16), allow_gloo=True)
    finally:
        endpoint.close()
