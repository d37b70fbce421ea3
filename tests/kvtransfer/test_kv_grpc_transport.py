"""The grpc transport between two real KVCaches over a real grpc.aio server."""

import asyncio

import grpc
import pytest
import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kvtransfer import KVHandle, KVLayout, KVLayoutError
from kvtransfer.base import TransferState
from kvtransfer.grpc_transport import ChannelPool, GrpcKVReceiver, add_servicer
from kvtransfer.registry import make_receiver
from kvtransfer.sources import CacheKVSource


def make_cache(dtype=torch.float32, num_blocks=16, fill=True):
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=dtype)
    cache = KVCache(spec, num_blocks, torch.device("cpu"))
    if fill:
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(0)))
    return cache


class Holder:
    """A KVCache served over gRPC, as a prefill worker would."""

    def __init__(self, cache, **servicer_options):
        self.source = CacheKVSource(cache)
        self.transfers = []
        self.server = grpc.aio.server()
        add_servicer(self.server, self.source,
                     on_transfer=lambda stats, state, err: self.transfers.append((stats, state, err)),
                     **servicer_options)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def handle(self, request_id, block_ids, num_tokens):
        self.source.hold(request_id, block_ids)
        return KVHandle(request_id, "holder", self.address, block_ids, num_tokens, 42, self.source.layout)

    async def __aenter__(self):
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_pull_copies_blocks_exactly(dtype):
    src, dst = make_cache(dtype), make_cache(dtype, fill=False)
    async with Holder(src, max_chunk_bytes=1000) as holder:   # force many chunks
        handle = holder.handle("r1", [5, 2, 11, 7], num_tokens=15)
        rx = make_receiver("grpc", KVLayout.from_spec(dst.spec))
        assert rx.poll() is TransferState.PENDING
        rx.start(handle, start_block=1)
        assert rx.poll() is TransferState.TRANSFERRING
        assert await rx.wait(timeout=10) is TransferState.DONE, rx.error
        dst.import_blocks([0, 1, 2], rx.result())
    assert torch.equal(dst.tensor[:, :, [0, 1, 2]], src.tensor[:, :, [2, 11, 7]])
    nbytes = 3 * src.spec.bytes_per_block
    assert rx.stats.num_bytes == nbytes and rx.stats.num_blocks == 3
    assert rx.stats.num_chunks == -(-nbytes // 1000) and rx.stats.gbps > 0
    [(sent, state, err)] = holder.transfers
    assert state is TransferState.DONE and err is None and sent.num_bytes == nbytes


async def test_corrupted_chunk_fails_and_nothing_is_imported():
    def flip_a_byte(chunk):
        if chunk.index == 2:
            chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]

    src, dst = make_cache(), make_cache(fill=False)
    async with Holder(src, max_chunk_bytes=512, chunk_hook=flip_a_byte) as holder:
        rx = GrpcKVReceiver(KVLayout.from_spec(dst.spec))
        rx.start(holder.handle("r1", [1, 2, 3], num_tokens=12))
        assert await rx.wait(timeout=10) is TransferState.FAILED
    assert "checksum mismatch in chunk 2" in rx.error
    with pytest.raises(RuntimeError, match="no KV to import: transfer is failed"):
        rx.result()
    assert not dst.tensor.any()


async def test_released_or_stale_handle_fails_with_reason():
    async with Holder(make_cache()) as holder:
        layout = holder.source.layout
        handle = holder.handle("r1", [1, 2], num_tokens=8)
        holder.source.hold("r1", [1, 3])               # the holder's blocks changed
        rx = GrpcKVReceiver(layout)
        rx.start(handle)
        assert await rx.wait(timeout=10) is TransferState.FAILED
        assert "FAILED_PRECONDITION" in rx.error
        holder.source.release("r1")
        rx = GrpcKVReceiver(layout)
        rx.start(handle)
        assert await rx.wait(timeout=10) is TransferState.FAILED
        assert "NOT_FOUND" in rx.error and "r1" in rx.error


async def test_incompatible_layout_is_refused_before_any_io():
    async with Holder(make_cache()) as holder:
        handle = holder.handle("r1", [1], num_tokens=4)
        rx = GrpcKVReceiver(KVLayout("float32", 8, 2, 2, 16))
        with pytest.raises(KVLayoutError, match="block_size 8 != 4"):
            rx.start(handle)
    assert rx.poll() is TransferState.PENDING and holder.transfers == []


async def test_abort_and_unreachable_source():
    src = make_cache(num_blocks=64)
    async with Holder(src, max_chunk_bytes=256) as holder:
        pool = ChannelPool()
        rx = GrpcKVReceiver(holder.source.layout, channels=pool)
        rx.start(holder.handle("r1", list(range(64)), num_tokens=256))
        rx.abort()
        assert rx.poll() is TransferState.FAILED and rx.error == "aborted"
        await asyncio.sleep(0.05)
        await pool.close()
    rx = GrpcKVReceiver(holder.source.layout, timeout_s=2)
    rx.start(KVHandle("r2", "gone", "127.0.0.1:1", [0], 4, 1, holder.source.layout))
    assert await rx.wait(timeout=10) is TransferState.FAILED
    assert "UNAVAILABLE" in rx.error or "DEADLINE" in rx.error


async def test_local_transport_and_registry():
    from kvtransfer import local
    src, dst = make_cache(), make_cache(fill=False)
    source = CacheKVSource(src)
    local.publish("inproc:holder", source)
    try:
        source.hold("r1", [4, 5])
        handle = KVHandle("r1", "holder", "inproc:holder", [4, 5], 8, 1, source.layout, transport="local")
        rx = make_receiver("local", KVLayout.from_spec(dst.spec))
        rx.start(handle)
        assert await rx.wait(5) is TransferState.DONE
        dst.import_blocks([0, 1], rx.result())
        assert torch.equal(dst.tensor[:, :, [0, 1]], src.tensor[:, :, [4, 5]])
        rx = make_receiver("local", source.layout)
        rx.start(KVHandle("r9", "holder", "inproc:holder", [1], 4, 1, source.layout, transport="local"))
        assert await rx.wait(5) is TransferState.FAILED and "no KV held" in rx.error
    finally:
        local.unpublish("inproc:holder")
