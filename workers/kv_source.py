"""The prefill worker's KVSource: exports held blocks on the engine thread."""

from __future__ import annotations

import logging

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from kvtransfer.staging import StagedExports
from workers.engine_loop import EngineLoop

log = logging.getLogger(__name__)


def _export(engine, handle: KVHandle, start_block: int, host_copy: bool) -> torch.Tensor:
    try:
        held = engine.get_held(handle.request_id)
    except KeyError:
        raise KVNotFound(f"no KV held for request {handle.request_id!r} (released, aborted or expired)") from None
    if list(held.block_ids) != list(handle.block_ids):
        raise KVStaleHandle(f"request {handle.request_id!r} now holds blocks {held.block_ids}, "
                            f"not the handle's {handle.block_ids}")
    if not 0 <= start_block <= len(held.block_ids):
        raise ValueError(f"start_block {start_block} outside [0, {len(held.block_ids)}]")
    data = engine.export_kv(handle.request_id, start_block)
    # byte transports need host memory: copy on the engine thread, in the engine's stream order
    return data.cpu() if host_copy else data


class EngineKVSource:
    """``host_copy``: exports land in CPU memory (grpc, local); a device transport
    (nccl) uses a source with ``host_copy=False``, which may also stage: export
    every newly held request right after its step (``stage``, an engine-loop
    after-step hook), so its pull finds the tensor ready (``take_staged``;
    kvtransfer/staging.py)."""

    def __init__(self, loop: EngineLoop, layout: KVLayout, host_copy: bool = True, stage_bytes: int = 0):
        self.loop = loop
        self.layout = layout
        self.host_copy = host_copy
        self.staged = StagedExports(stage_bytes)
        self._stage_failed = False

    def take_staged(self, handle: KVHandle, start_block: int) -> torch.Tensor | None:
        return self.staged.take(handle, start_block)

    def stage(self, engine, outputs) -> None:
        """Engine thread, after every loop iteration: forget what is no longer held,
        export what just became held (while the budget lasts)."""
        held = engine.held_requests
        if len(self.staged):
            self.staged.retain(held)
        for out in outputs:
            rid = out.request_id
            if not out.metrics.get("held") or rid not in held or rid in self.staged or self._stage_failed:
                continue
            h = held[rid]
            if not self.staged.fits(self.layout.tp_size * self.layout.bytes_per_block * len(h.block_ids)):
                continue
            try:
                self.staged.put(rid, h.block_ids, engine.export_kv(rid))
            except torch.cuda.OutOfMemoryError:
                self._stage_failed = True      # no headroom: pulls export on demand from now on
                log.warning("staging KV exports ran out of GPU memory; exporting on demand instead")

    async def export(self, handle: KVHandle, start_block: int) -> torch.Tensor:
        # export_kv copies (index_select) on the engine thread, so the blocks may be
        # released or reused the moment this returns
        return await self.loop.call(_export, handle, start_block, self.host_copy)
