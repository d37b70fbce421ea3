"""The ``nccl`` transport: KV blocks GPU to GPU in one NCCL send per request.

Holder (``serve(source, ctx)``, registered below): on a worker with a GPU, a
``PairHost`` (kvtransfer/nccl_pairs.py) for its source; its rendezvous store
address is advertised as ``ctx.advertised["nccl"]`` — holders put it in their
handles' ``transport_address``. ``ctx.options["nccl"]`` may set ``device``
(default: the current CUDA device), ``host`` (the address to bind; default:
the host of ``ctx.address``) and ``allow_gloo`` (serve a CPU holder over gloo:
tests). Without a GPU and ``allow_gloo`` nothing is served and nothing
advertised. The undo callable tears every pair down.

Receiver (``NcclKVReceiver``): pulls through its ``PairClient`` (one per
decode worker: option ``nccl_endpoint``; default: one per process on the
current CUDA device), building the pair with the holder on first use. Where
no NCCL path exists — the handle has no ``transport_address`` (the holder has
no GPU), this worker has no GPU, the holder is on another host, the backends
differ, or the rendezvous fails — it pulls over ``grpc`` from
``source_address`` instead, and says so: ``stats.transport`` /
``stats.fallback_reason`` on the receiver, and the process-wide counter
``baton:kv_transfer_fallbacks_total{transport="nccl", reason}``.
"""

from __future__ import annotations

import logging
import threading

import torch

from kvtransfer.base import KVReceiver, KVSource, KVTransferError
from kvtransfer.layout import KVLayout
from kvtransfer.nccl_pairs import NoPath, PairClient, PairHost
from kvtransfer.registry import ServeContext, Transport, register_transport

log = logging.getLogger(__name__)

FALLBACKS: dict[str, int] = {}      # reason → count (also exported to Prometheus when available)
_fallback_counter = None
_default_endpoint: PairClient | None = None
_lock = threading.Lock()


def _count_fallback(reason: str) -> None:
    global _fallback_counter
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1
    try:
        if _fallback_counter is None:
            from prometheus_client import Counter
            _fallback_counter = Counter("baton:kv_transfer_fallbacks", "KV pulls that could not use the "
                                        "requested transport and used another.", ["transport", "to", "reason"])
        _fallback_counter.labels("nccl", "grpc", reason).inc()
    except ImportError:
        pass


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_endpoint() -> PairClient:
    """This process's receiver end: the current CUDA device, or a CPU one (which
    has no NCCL path: its pulls fall back to grpc)."""
    global _default_endpoint
    with _lock:
        if _default_endpoint is None:
            _default_endpoint = PairClient(_current_device())
        return _default_endpoint


class NcclKVReceiver(KVReceiver):
    def __init__(self, local_layout: KVLayout, *, nccl_endpoint: PairClient | None = None,
                 allow_gloo: bool = False, **grpc_options):
        super().__init__(local_layout)
        self.endpoint = nccl_endpoint
        self.allow_gloo = allow_gloo
        self.grpc_options = grpc_options
        self.stats.transport = "nccl"
        self.wire_seconds = 0.0     # recv posted → bytes landed (no event-loop hops)
        self.wire_phases: dict = {}  # its parts in ms (kvtransfer.nccl_pairs.PullResult.phases)

    def _no_path(self, endpoint: PairClient) -> str | None:
        if not self.handle.transport_address:
            return "holder_without_nccl"
        if endpoint.device.type != "cuda" and not self.allow_gloo:
            return "no_gpu"
        return None

    async def _run(self) -> torch.Tensor:
        endpoint = self.endpoint or default_endpoint()
        reason = self._no_path(endpoint)
        if reason is None:
            try:
                pair = await endpoint.pair_for(self.handle.transport_address)
            except NoPath as e:
                log.info("kv %s: no NCCL path (%s)", self.handle.request_id, e)
                reason = e.reason
        if reason is not None:
            return await self._fallback(reason)
        remote = self.handle.layout
        result = await endpoint.pull(pair, self.handle, self.start_block,
                                     remote.wire_shape(self.stats.num_blocks), getattr(torch, remote.dtype))
        self.stats.num_bytes = result.data.numel() * result.data.element_size()
        self.stats.num_chunks = 1
        self.wire_seconds = result.seconds
        self.wire_phases = result.phases
        return result.data

    async def _fallback(self, reason: str) -> torch.Tensor:
        from kvtransfer.grpc_transport import GrpcKVReceiver
        _count_fallback(reason)
        self.stats.transport, self.stats.fallback_reason = "grpc", reason
        rx = GrpcKVReceiver(self.local_layout, **self.grpc_options)
        rx._begin(self.handle, self.start_block)
        try:
            return await rx._run()
        finally:
            self.stats.num_bytes, self.stats.num_chunks = rx.stats.num_bytes, rx.stats.num_chunks


def _export_fn(source: KVSource):
    """A thread-callable export: ``export_sync`` when the source has one, else its
    coroutine run on the loop that was running at serve time. (A source's staged
    exports, ``take_staged``, go to the PairHost beside it.)"""
    if hasattr(source, "export_sync"):
        return source.export_sync
    import asyncio
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def export(handle, start_block):
        if loop is None:
            return asyncio.run(source.export(handle, start_block))
        return asyncio.run_coroutine_threadsafe(source.export(handle, start_block), loop).result()
    return export


def serve(source: KVSource, ctx: ServeContext):
    opts = ctx.options.get("nccl", {})
    device = opts.get("device")
    device = _current_device() if device is None else torch.device(device)
    if device.type != "cuda" and not opts.get("allow_gloo"):
        return lambda: None          # no GPU: nothing to serve, handles carry no transport_address
    host = opts.get("host") or ctx.address.rpartition(":")[0] or "127.0.0.1"
    pair_host = PairHost(_export_fn(source), device, host, opts.get("timeout_s", 120.0),
                         take_staged=getattr(source, "take_staged", None))
    ctx.advertised["nccl"] = pair_host.store_address
    return pair_host.close


def _make_receiver(local_layout: KVLayout, **options) -> NcclKVReceiver:
    return NcclKVReceiver(local_layout, **options)


register_transport(Transport("nccl", _make_receiver, serve))

__all__ = ["NcclKVReceiver", "PairClient", "PairHost", "FALLBACKS", "default_endpoint", "serve",
           "KVTransferError"]
