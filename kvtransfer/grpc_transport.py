"""The ``grpc`` transport: the decode side pulls chunks from the holder's PullKV.

Holder: ``KVTransferServicer(source)`` on the worker's grpc.aio server. Per
PullKV call it makes a ``GrpcKVSender``: export the blocks (a copy, taken on
the engine thread by the source), view them as bytes, stream ``KVChunk``s of
at most ``max_chunk_bytes`` (1 MiB default, 3 MiB cap) with an xxh64 each.
The first chunk carries the header (layout, shape, sizes).

Receiver: ``GrpcKVReceiver`` calls PullKV on ``handle.source_address``,
checks the header against its own layout and the handle, verifies every chunk
into one preallocated buffer, and reaches DONE only when all bytes arrived
intact; any corruption, truncation or RPC error gives FAILED with the reason.

``chunk_hook`` on the servicer is a test seam: it sees each outgoing
``KVChunk`` after its checksum was computed (tests corrupt data there).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import grpc

from kvtransfer import codec
from kvtransfer.base import (KVNotFound, KVReceiver, KVSender, KVSource, KVStaleHandle, KVTransferError,
                             TransferState, TransferStats)
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout, KVLayoutError
from kvtransfer.registry import ServeContext, Transport, register_transport
from kvtransfer.wire import GRPC_OPTIONS, handle_from_pb, handle_to_pb, layout_from_pb, layout_to_pb
from protos.gen import kv_transfer_pb2 as pb
from protos.gen import kv_transfer_pb2_grpc as pb_grpc

class GrpcKVSender(KVSender):
    """One PullKV stream on the holder's side; iterate ``chunks()`` after ``start``."""

    def __init__(self, source: KVSource, max_chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 chunk_hook: Callable[[pb.KVChunk], None] | None = None):
        super().__init__(source)
        self.max_chunk_bytes = max(1, min(max_chunk_bytes or codec.DEFAULT_CHUNK_BYTES, codec.MAX_CHUNK_BYTES))
        self.chunk_hook = chunk_hook

    def start(self, handle: KVHandle, start_block: int = 0) -> None:
        self._begin(handle, start_block)

    async def chunks(self) -> AsyncIterator[pb.KVChunk]:
        try:
            data = await self.source.export(self.handle, self.start_block)
            buf = codec.tensor_bytes(data)
            layout = self.source.layout
            total = len(buf)
            header = pb.KVTransferHeader(layout=layout_to_pb(layout), num_blocks=self.stats.num_blocks,
                                         shape=list(data.shape), total_bytes=total,
                                         num_chunks=codec.num_chunks(total, self.max_chunk_bytes))
            for index, offset, payload, digest in codec.split(buf, self.max_chunk_bytes):
                if self.state.is_final:   # aborted
                    return
                msg = pb.KVChunk(index=index, offset=offset, data=payload, checksum=digest)
                if index == 0:
                    msg.header.CopyFrom(header)
                if self.chunk_hook is not None:
                    self.chunk_hook(msg)
                self.stats.num_bytes += len(payload)
                self.stats.num_chunks += 1
                yield msg
        except BaseException as e:
            self._finish(str(e) or type(e).__name__)
            raise
        self._finish()


class KVTransferServicer(pb_grpc.KVTransferServicer):
    """Serves PullKV from one ``KVSource``. ``on_transfer(stats, state, error)`` is
    called after every stream (for the holder's metrics)."""

    def __init__(self, source: KVSource, *, max_chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 chunk_hook: Callable[[pb.KVChunk], None] | None = None,
                 on_transfer: Callable[[TransferStats, TransferState, str | None], None] | None = None):
        self.source = source
        self.max_chunk_bytes = max_chunk_bytes
        self.chunk_hook = chunk_hook
        self.on_transfer = on_transfer

    async def PullKV(self, request: pb.PullKVRequest, context: grpc.aio.ServicerContext):
        try:
            handle = handle_from_pb(request.handle)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad KV handle: {e}")
        sender = GrpcKVSender(self.source, request.max_chunk_bytes or self.max_chunk_bytes, self.chunk_hook)
        try:
            sender.start(handle, request.start_block)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        code = None
        try:
            async for chunk in sender.chunks():
                yield chunk
        except KVNotFound as e:
            code, msg = grpc.StatusCode.NOT_FOUND, str(e)
        except KVStaleHandle as e:
            code, msg = grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except ValueError as e:
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except asyncio.CancelledError:
            sender.abort()
            raise
        finally:
            if self.on_transfer is not None:
                self.on_transfer(sender.stats, sender.state, sender.error)
        if code is not None:
            await context.abort(code, msg)


class ChannelPool:
    """One grpc.aio channel per peer address, shared by a process's KV receivers and
    worker clients: a decode worker's pulls from a holder and its Release calls to it
    ride one channel (one connection). Made on first use; ``discard(address)`` when
    the peer left (the channel closes once the RPCs still on it end, or after
    ``close_grace_s``); ``close()`` at shutdown."""

    def __init__(self, close_grace_s: float = 5.0) -> None:
        self.close_grace_s = close_grace_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return ch

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def discard(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            task = asyncio.get_running_loop().create_task(ch.close(self.close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


class GrpcKVReceiver(KVReceiver):
    def __init__(self, local_layout: KVLayout, *, channels: ChannelPool | None = None,
                 max_chunk_bytes: int = 0, timeout_s: float | None = 120.0, **_other_transports_options):
        super().__init__(local_layout)
        self.stats.transport = "grpc"
        self.channels = channels
        self.max_chunk_bytes = max_chunk_bytes
        self.timeout_s = timeout_s

    async def _run(self):
        own_channel = None
        if self.channels is not None:
            channel = self.channels.get(self.handle.source_address)
        else:
            channel = own_channel = grpc.aio.insecure_channel(self.handle.source_address, options=GRPC_OPTIONS)
        call = pb_grpc.KVTransferStub(channel).PullKV(
            pb.PullKVRequest(handle=handle_to_pb(self.handle), start_block=self.start_block,
                             max_chunk_bytes=self.max_chunk_bytes), timeout=self.timeout_s)
        try:
            assembler = None
            async for chunk in call:
                if assembler is None:
                    assembler = self._open(chunk)
                assembler.add(chunk.index, chunk.offset, chunk.data, chunk.checksum)
                self.stats.num_bytes, self.stats.num_chunks = assembler.received, assembler.next_index
            if assembler is None:
                raise KVTransferError("PullKV stream ended without a chunk")
            return assembler.tensor()
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"PullKV from {self.handle.source_address} failed: "
                                        f"{e.code().name}: {e.details()}") from None
        finally:
            call.cancel()   # no-op when finished; stops the sender on early exit
            if own_channel is not None:
                await own_channel.close()

    def _open(self, chunk: pb.KVChunk) -> codec.ChunkAssembler:
        if not chunk.HasField("header"):
            raise KVTransferError("first KV chunk carries no header")
        h = chunk.header
        try:
            remote = layout_from_pb(h.layout)
        except KVLayoutError as e:
            raise KVTransferError(f"sender sent a bad layout: {e}") from None
        self.local_layout.check_compatible(remote)
        expected_shape = self.handle.layout.wire_shape(self.stats.num_blocks)
        if h.num_blocks != self.stats.num_blocks or tuple(h.shape) != expected_shape:
            raise KVTransferError(f"sender offers {h.num_blocks} blocks of shape {tuple(h.shape)}, "
                                        f"expected {self.stats.num_blocks} of shape {expected_shape}")
        return codec.ChunkAssembler(remote, expected_shape, h.total_bytes, h.num_chunks)


def add_servicer(server: grpc.aio.Server, source: KVSource, **options) -> KVTransferServicer:
    servicer = KVTransferServicer(source, **options)
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    return servicer


def _serve(source: KVSource, ctx: ServeContext):
    if ctx.grpc_server is None:
        raise ValueError("the grpc KV transport needs the holder's grpc.aio server")
    add_servicer(ctx.grpc_server, source, **ctx.options.get("grpc", {}))
    return lambda: None   # lives as long as the server


register_transport(Transport("grpc", lambda layout, **opts: GrpcKVReceiver(layout, **opts), _serve))
