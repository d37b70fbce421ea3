"""WorkerServicer: the Worker gRPC service (protos/worker.proto) over an EngineLoop.

Lifecycle of a request in a worker (each rpc handler is one asyncio task; the
engine is reached only through ``EngineLoop.call``/``post``):

- Prefill (prefill role): subscribe → admit (queue bound, ``add_request``) →
  wait for the finished output → held: read ``get_held`` and return the
  handle; finished at the first token (EOS, stop, max_tokens=1): return the
  handle without blocks and ``finish_reason``. With ``params.logprobs`` the
  response carries the first token's top logprobs (``first_logprobs``).
- Decode (decode/colocated role): check the handle and layouts → subscribe →
  ``add_request_with_kv`` (local prefix hits) → pull the missing blocks through
  the handle's transport (the receiver never touches the engine) → Release on
  the prefill worker (success or failure: the blocks stay in its prefix cache)
  → ``import_kv`` + ``finish_kv`` in one engine command → stream chunks (the
  first token is not repeated) until every completion finished.
- Generate (decode/colocated role): subscribe → ``add_request`` → stream.
- Any handler that exits early (client cancel, error) aborts its request in
  the engine from its ``finally``; the Abort rpc aborts the engine request,
  stops an in-flight pull and ends the stream with ``finish_reason="abort"``.

Errors map to gRPC codes in one place (``_status``): ValueError (bad input,
KVLayoutError) → INVALID_ARGUMENT, full queue / KV pool → RESOURCE_EXHAUSTED,
wrong role → FAILED_PRECONDITION, failed pull → DATA_LOSS, shutdown →
UNAVAILABLE, anything else → INTERNAL. A request's failure never ends the worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from kvtransfer.base import KVReceiver, KVTransferError, TransferState
from kvtransfer.handle import KVHandle
from kvtransfer.registry import get_transport, make_receiver
from kvtransfer.wire import handle_from_pb, handle_to_pb
from protos.gen import worker_pb2 as pb
from protos.gen import worker_pb2_grpc as pb_grpc
from workers.engine_loop import ABORTED, EngineFailure
from workers.streams import CompletionStream
from workers.wire import chunk_to_pb, params_from_pb, stats_to_pb

if TYPE_CHECKING:
    from workers.host import WorkerHost

log = logging.getLogger(__name__)


class Busy(Exception):
    """The worker's queue is full."""


class RoleError(Exception):
    """The rpc does not fit this worker's role."""


class TransferFailed(Exception):
    """Pulling the KV failed."""


class RequestAborted(Exception):
    """The request was aborted while the rpc waited for it."""


_CODES = [(Busy, grpc.StatusCode.RESOURCE_EXHAUSTED), (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (ValueError, grpc.StatusCode.INVALID_ARGUMENT), (RoleError, grpc.StatusCode.FAILED_PRECONDITION),
          (TransferFailed, grpc.StatusCode.DATA_LOSS), (RequestAborted, grpc.StatusCode.ABORTED)]


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES:
        if isinstance(e, cls):
            if isinstance(e, MemoryError):
                return code, f"KV cache full: {e}"
            return code, str(e) or type(e).__name__
    if isinstance(e, RuntimeError) and "shutting down" in str(e):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    log.error("internal error: %r", e, exc_info=e if not isinstance(e, EngineFailure) else None)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


@dataclass
class _Live:
    """A request with an rpc waiting on it."""
    queue: asyncio.Queue
    receiver: KVReceiver | None = None
    aborted: bool = False
    admitted: bool = False   # set on the engine thread by the admitting command


def _streaming_rpc(rpc: str):
    """Turn an async-generator handler ``(self, request)`` into the server-streaming
    rpc ``(self, request, context)``: an exception becomes its status code (``_status``),
    every outcome is counted, and a stream that ends early (client cancel, error)
    closes the handler at once, so its ``finally`` aborts the request now, not at GC."""
    def wrap(handler):
        @functools.wraps(handler)
        async def method(self: "WorkerServicer", request, context):
            gen = handler(self, request)
            try:
                async for msg in gen:
                    yield msg
            except (asyncio.CancelledError, GeneratorExit):
                self.metrics.request(rpc, "cancelled")
                raise
            except Exception as e:
                await self._fail(rpc, context, e)
            finally:
                await gen.aclose()
            self.metrics.request(rpc, "ok")
        return method
    return wrap


# ---- engine commands (run on the engine thread) ----------------------------------

def _check_queue(engine, max_waiting: int) -> None:
    waiting = engine.stats().num_waiting
    if waiting >= max_waiting:
        raise Busy(f"worker queue is full ({waiting} requests waiting, limit {max_waiting})")


def _admit(engine, live: _Live, rid: str, prompt: list[int], params, max_waiting: int, arrival: float) -> None:
    _check_queue(engine, max_waiting)
    engine.add_request(rid, prompt, params, arrival_time=arrival)
    live.admitted = True


def _admit_with_kv(engine, live: _Live, handle: KVHandle, params, max_waiting: int):
    _check_queue(engine, max_waiting)
    plan = engine.add_request_with_kv(handle.request_id, handle.prompt_token_ids, handle.first_token, params)
    live.admitted = True
    return plan


def _abort_if_admitted(engine, rid: str, live: _Live) -> None:
    # runs after the admitting command (FIFO), even if the rpc was cancelled while it waited
    if live.admitted:
        engine.abort(rid)


def _import_and_run(engine, rid: str, data, first_logprob: float | None) -> list:
    try:
        if data is not None and data.shape[2] > 0:
            engine.import_kv(rid, data)
    except KeyError:
        raise RequestAborted(f"request {rid!r} was aborted while its KV arrived") from None
    except Exception:
        engine.finish_kv(rid, False)
        raise
    return engine.finish_kv(rid, True, first_logprob)


def _abort(engine, rid: str) -> bool:
    return engine.abort(rid)


def _release(engine, rid: str) -> bool:
    return engine.release(rid)


def _get_held(engine, rid: str):
    return engine.get_held(rid)


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, host: "WorkerHost"):
        self.host = host
        self.loop = host.loop
        self.metrics = host.metrics
        self._live: dict[str, _Live] = {}
        self._background: set[asyncio.Task] = set()

    # ---- plumbing ------------------------------------------------------------------
    def _require(self, *roles: str) -> None:
        if self.host.role not in roles:
            raise RoleError(f"{self.host.role} worker {self.host.worker_id} does not serve this rpc "
                            f"(needs role {' or '.join(roles)})")

    def _open(self, rid: str) -> _Live:
        if not rid:
            raise ValueError("request_id is required")
        live = self._live[rid] = _Live(self.loop.subscribe(rid))
        return live

    def _close(self, rid: str, live: _Live, finished: bool) -> None:
        """The rpc leaves. Unless its request finished, abort it — only if this rpc
        admitted it (a refused duplicate must not abort the request owning the id)."""
        if self._live.get(rid) is live:
            del self._live[rid]
            self.loop.unsubscribe(rid)
        if live.receiver is not None:
            live.receiver.abort()
        if not finished:
            self.loop.post(_abort_if_admitted, rid, live)

    async def _next(self, live: _Live) -> Any:
        item = await live.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unary(self, rpc: str, context, coro):
        try:
            result = await coro
        except asyncio.CancelledError:
            self.metrics.request(rpc, "cancelled")
            raise
        except Exception as e:
            await self._fail(rpc, context, e)
        self.metrics.request(rpc, "ok")
        return result

    async def _fail(self, rpc: str, context, e: Exception):
        """Count the failure and end the rpc with its status code (raises)."""
        code, msg = _status(e)
        self.metrics.request(rpc, code.name.lower())
        await context.abort(code, msg)

    # ---- Prefill ----------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        return await self._unary("prefill", context, self._prefill(request))

    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        arrival = time.monotonic()
        self._require("prefill")
        params = params_from_pb(request.params)
        prompt = list(request.prompt_token_ids)
        rid = request.request_id
        live = self._open(rid)
        done = False
        try:
            await self.loop.call(_admit, live, rid, prompt, params, self.host.max_waiting, arrival)
            while True:
                out = await self._next(live)
                if out is ABORTED:
                    raise RequestAborted(f"request {rid!r} was aborted during prefill")
                if out.finished:
                    break
            host = self.host
            if out.metrics.get("held"):
                try:
                    held = await self.loop.call(_get_held, rid)
                except KeyError:
                    raise RequestAborted(f"request {rid!r} was released or aborted before its handle was sent")
                handle = KVHandle(rid, host.worker_id, host.address, list(held.block_ids), held.num_tokens,
                                  held.first_token, host.layout, host.kv_transport, prompt_token_ids=prompt,
                                  first_logprob=held.first_logprob, transport_address=host.kv_transport_address)
            else:   # complete at its first token: nothing held
                handle = KVHandle(rid, host.worker_id, host.address, [], len(prompt),
                                  out.token_ids[0] if out.token_ids else 0, host.layout, host.kv_transport,
                                  prompt_token_ids=prompt)
            done = True
        finally:
            self._close(rid, live, done)
        m = out.metrics
        queue_s = prefill_s = 0.0
        if m.get("first_scheduled_time") is not None:
            queue_s = m["first_scheduled_time"] - m["arrival_time"]
            self.metrics.queue_time.observe(queue_s)
            if m.get("first_token_time") is not None:
                prefill_s = m["first_token_time"] - m["first_scheduled_time"]
                self.metrics.prefill_compute.observe(prefill_s)
                self.metrics.ttft.observe(m["first_token_time"] - m["arrival_time"])
        resp = pb.PrefillResponse(handle=handle_to_pb(handle), first_text=out.text,
                                  finish_reason=out.finish_reason or "", num_cached_tokens=out.num_cached_tokens,
                                  queue_seconds=queue_s, prefill_seconds=prefill_s)
        first_logprobs = out.outputs[0].logprobs if out.outputs else None
        if first_logprobs:
            resp.first_logprobs.logprobs.update(first_logprobs[0])
        return resp

    # ---- Decode --------------------------------------------------------------------------
    @_streaming_rpc("decode")
    async def Decode(self, request: pb.DecodeRequest):
        arrival = time.monotonic()
        self._require("decode", "colocated")
        handle = handle_from_pb(request.handle)
        params = params_from_pb(request.params)
        bs = self.host.layout.block_size
        if not handle.prompt_token_ids or len(handle.prompt_token_ids) != handle.num_tokens:
            raise ValueError(f"handle has {len(handle.prompt_token_ids)} prompt token ids for "
                             f"num_tokens={handle.num_tokens}")
        if handle.num_blocks != -(-handle.num_tokens // bs):
            raise ValueError(f"handle has {handle.num_blocks} blocks for {handle.num_tokens} tokens "
                             f"of block size {bs}")
        self.host.layout.check_compatible(handle.layout)
        try:
            get_transport(handle.transport)
        except KVTransferError as e:
            raise ValueError(str(e)) from None
        rid = handle.request_id
        live = self._open(rid)
        finished = False
        stream = CompletionStream(params, skip_first=True)
        try:
            plan = await self.loop.call(_admit_with_kv, live, handle, params, self.host.max_waiting)
            data, tstats = None, None
            if plan.missing_block_ids and not live.aborted:
                extra = {"nccl_endpoint": self.host.nccl_endpoint} if handle.transport == "nccl" else {}
                rx = live.receiver = make_receiver(handle.transport, self.host.layout,
                                                   channels=self.host.channels,
                                                   timeout_s=self.host.pull_timeout_s, **extra)
                rx.start(handle, plan.num_cached_blocks)
                state = await rx.wait()
                live.receiver = None
                if not live.aborted:
                    self.metrics.transfer(rx.stats, state is TransferState.DONE)
                    if state is TransferState.FAILED:
                        self._spawn(self.host.release_remote(handle))
                        raise TransferFailed(f"KV transfer of {rid!r} from {handle.source_worker} "
                                             f"({handle.source_address}) failed: {rx.error}")
                    data, tstats = rx.result(), rx.stats
            self._spawn(self.host.release_remote(handle))
            if live.aborted:
                for c in stream.abort_chunks(plan.num_cached_tokens):
                    yield chunk_to_pb(c)
                return
            pending = list(await self.loop.call(_import_and_run, rid, data, handle.first_logprob))
            self.metrics.decode_admission.observe(time.monotonic() - arrival)
            first = True
            async for c in self._chunks(live, stream, pending, arrival):
                if first and tstats is not None:
                    c.kv_transfer_seconds, c.kv_transfer_bytes = tstats.seconds, tstats.num_bytes
                first = False
                yield chunk_to_pb(c)
            finished = True
        except RequestAborted:
            for c in stream.abort_chunks():
                yield chunk_to_pb(c)
        finally:
            self._close(rid, live, finished)

    # ---- Generate --------------------------------------------------------------------------
    @_streaming_rpc("generate")
    async def Generate(self, request: pb.GenerateRequest):
        arrival = time.monotonic()
        self._require("decode", "colocated")
        params = params_from_pb(request.params)
        rid = request.request_id
        live = self._open(rid)
        finished = False
        stream = CompletionStream(params)
        try:
            await self.loop.call(_admit, live, rid, list(request.prompt_token_ids), params,
                                 self.host.max_waiting, arrival)
            first = True
            async for c in self._chunks(live, stream, [], arrival):
                if first and c.token_ids:
                    self.metrics.ttft.observe(time.monotonic() - arrival)
                    first = False
                yield chunk_to_pb(c)
            finished = True
        finally:
            self._close(rid, live, finished)

    async def _chunks(self, live: _Live, stream: CompletionStream, pending: list, arrival: float):
        """Chunks of the outputs in ``pending``, then of those the engine streams in."""
        last = None
        while not stream.finished:
            out = pending.pop(0) if pending else await self._next(live)
            if out is ABORTED:
                for c in stream.abort_chunks():
                    yield c
                return
            for c in stream.chunks(out):
                now = time.monotonic()
                if last is not None and c.token_ids:
                    self.metrics.itl.observe(now - last)
                if c.token_ids:
                    last = now
                yield c
        self.metrics.e2e.observe(time.monotonic() - arrival)

    # ---- control ---------------------------------------------------------------------------
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return await self._unary("abort", context, self._abort_rpc(request.request_id))

    async def _abort_rpc(self, rid: str) -> pb.AbortResponse:
        live = self._live.get(rid)
        if live is not None:
            live.aborted = True
            if live.receiver is not None:
                live.receiver.abort()
            self.loop.notify(rid, ABORTED)
        found = await self.loop.call(_abort, rid)
        return pb.AbortResponse(found=found or live is not None)

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        async def run():
            self._require("prefill")
            return pb.ReleaseResponse(found=await self.loop.call(_release, request.request_id))
        return await self._unary("release", context, run())

    async def Stats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return await self._unary("stats", context, self._stats())

    async def _stats(self) -> pb.WorkerStats:
        return stats_to_pb(await self.host.stats())
