"""The ``local`` transport: both sides in one process (tests, in-process workers).

Holders publish their ``KVSource`` under their address; a receiver looks the
handle's ``source_address`` up and awaits the export directly (no bytes are
serialized; the export is already a copy, so the holder may free its blocks).
"""

from __future__ import annotations

import asyncio

import torch

from kvtransfer.base import KVReceiver, KVSender, KVSource, KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.registry import ServeContext, Transport, register_transport

_SOURCES: dict[str, KVSource] = {}


class LocalKVSender(KVSender):
    def start(self, handle: KVHandle, start_block: int = 0) -> None:
        self._begin(handle, start_block)
        self._task = asyncio.get_running_loop().create_task(self._export())

    async def _export(self) -> torch.Tensor:
        try:
            data = await self.source.export(self.handle, self.start_block)
        except Exception as e:
            self._finish(str(e) or type(e).__name__)
            raise
        self.stats.num_bytes = data.numel() * data.element_size()
        self.stats.num_chunks = 1
        self._finish()
        return data


class LocalKVReceiver(KVReceiver):
    async def _run(self) -> torch.Tensor:
        source = _SOURCES.get(self.handle.source_address)
        if source is None:
            raise KVTransferError(f"no local KV source at {self.handle.source_address!r}")
        sender = LocalKVSender(source)
        sender.start(self.handle, self.start_block)
        try:
            data = await sender._task
        except asyncio.CancelledError:
            sender.abort()
            raise
        expected = self.handle.layout.wire_shape(self.stats.num_blocks)
        if tuple(data.shape) != expected:
            raise KVTransferError(f"local export has shape {tuple(data.shape)}, expected {expected}")
        self.stats.num_bytes, self.stats.num_chunks = sender.stats.num_bytes, 1
        return data


def publish(address: str, source: KVSource) -> None:
    _SOURCES[address] = source


def unpublish(address: str) -> None:
    _SOURCES.pop(address, None)


def _serve(source: KVSource, ctx: ServeContext):
    publish(ctx.address, source)
    return lambda: unpublish(ctx.address)


register_transport(Transport("local", lambda layout, **_: LocalKVReceiver(layout), _serve))
