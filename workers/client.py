"""WorkerClient: the async client of one worker (docs/contracts.md), used by the router.

Torch-free. One grpc.aio channel per client, opened lazily in the running loop,
or a shared one passed in (``channel=``; the client then never closes it).
gRPC errors map to Python: INVALID_ARGUMENT → ValueError, RESOURCE_EXHAUSTED →
WorkerBusy, anything else → WorkerError (``.code`` holds the status name).
Breaking out of a ``decode``/``generate`` iteration cancels the stream, which
aborts the request on the worker.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from engine.request import SamplingParams
from kvtransfer.handle import KVHandle
from kvtransfer.wire import GRPC_OPTIONS, handle_from_pb, handle_to_pb
from protos.gen import worker_pb2 as pb
from protos.gen import worker_pb2_grpc as pb_grpc
from workers.errors import WorkerBusy, WorkerError
from workers.types import DecodeChunk, PrefillResult, WorkerStats
from workers.wire import chunk_from_pb, params_to_pb, stats_from_pb

def _map_error(e: grpc.aio.AioRpcError, address: str) -> Exception:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerBusy(f"worker {address} is busy: {details}")
    return WorkerError(f"worker {address}: {code.name}: {details}", code.name)


class WorkerClient:
    def __init__(self, address: str, *, timeout_s: float | None = None,
                 channel: grpc.aio.Channel | None = None):
        self.address = address
        self.timeout_s = timeout_s          # deadline for unary calls (None: none)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.WorkerStub | None = None
        if channel is not None:             # borrowed: its owner closes it
            self._stub = pb_grpc.WorkerStub(channel)

    @property
    def stub(self) -> pb_grpc.WorkerStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
            self._stub = pb_grpc.WorkerStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> "WorkerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, self.address) from None

    async def _stream(self, call) -> AsyncIterator[DecodeChunk]:
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, self.address) from None
        finally:
            call.cancel()       # no-op when the stream ended; aborts the request otherwise

    # ---- the contract ----------------------------------------------------------------
    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVHandle:
        """Run the prompt on a prefill worker; the handle carries the first token. If the
        request already finished at its first token, ``handle.block_ids`` is empty (use
        ``prefill_full`` to get the finish reason and timings)."""
        return (await self.prefill_full(request_id, prompt_token_ids, params))[0]

    async def prefill_full(self, request_id: str, prompt_token_ids: list[int],
                           params: SamplingParams) -> tuple[KVHandle, PrefillResult]:
        resp = await self._unary(self.stub.Prefill, pb.PrefillRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_pb(params)))
        return handle_from_pb(resp.handle), PrefillResult(
            first_text=resp.first_text, finish_reason=resp.finish_reason or None,
            num_cached_tokens=resp.num_cached_tokens, queue_seconds=resp.queue_seconds,
            prefill_seconds=resp.prefill_seconds,
            first_logprobs=dict(resp.first_logprobs.logprobs) if resp.HasField("first_logprobs") else None)

    def decode(self, handle: KVHandle, params: SamplingParams) -> AsyncIterator[DecodeChunk]:
        """Stream the rest of the completion (the first token is not repeated)."""
        return self._stream(self.stub.Decode(pb.DecodeRequest(handle=handle_to_pb(handle),
                                                              params=params_to_pb(params))))

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[DecodeChunk]:
        """Prefill and decode on this worker, streaming from the first token."""
        return self._stream(self.stub.Generate(pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_pb(params))))

    async def abort(self, request_id: str) -> bool:
        return (await self._unary(self.stub.Abort, pb.AbortRequest(request_id=request_id))).found

    async def release(self, request_id: str) -> bool:
        return (await self._unary(self.stub.Release, pb.ReleaseRequest(request_id=request_id))).found

    async def stats(self) -> WorkerStats:
        return stats_from_pb(await self._unary(self.stub.Stats, pb.StatsRequest()))
