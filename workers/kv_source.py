"""The prefill worker's KVSource: exports held blocks on the engine thread."""

from __future__ import annotations

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from workers.engine_loop import EngineLoop


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
    (nccl) would use a source with ``host_copy=False``."""

    def __init__(self, loop: EngineLoop, layout: KVLayout, host_copy: bool = True):
        self.loop = loop
        self.layout = layout
        self.host_copy = host_copy

    async def export(self, handle: KVHandle, start_block: int) -> torch.Tensor:
        # export_kv copies (index_select) on the engine thread, so the blocks may be
        # released or reused the moment this returns
        return await self.loop.call(_export, handle, start_block, self.host_copy)
