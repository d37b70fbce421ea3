"""A ``KVSource`` over a bare ``engine.kv_cache.KVCache`` (tests, microbenchmarks).

Lifecycle: ``hold(request_id, block_ids)`` → exports of ``[start_block:]`` for
handles that match → ``release(request_id)``. Workers implement their own
source on top of the engine (workers/kv_source.py).
"""

from __future__ import annotations

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout


class CacheKVSource:
    def __init__(self, kv_cache, tp_rank: int = 0, tp_size: int = 1):
        self.kv_cache = kv_cache
        self.layout = KVLayout.from_spec(kv_cache.spec, tp_rank, tp_size)
        self.held: dict[str, list[int]] = {}

    def hold(self, request_id: str, block_ids: list[int]) -> None:
        self.held[request_id] = list(block_ids)

    def release(self, request_id: str) -> bool:
        return self.held.pop(request_id, None) is not None

    async def export(self, handle: KVHandle, start_block: int) -> torch.Tensor:
        return self.export_sync(handle, start_block)

    def export_sync(self, handle: KVHandle, start_block: int) -> torch.Tensor:
        """Same as ``export``, callable from any thread (the nccl holder's pair
        threads use it, skipping an event-loop hop)."""
        block_ids = self.held.get(handle.request_id)
        if block_ids is None:
            raise KVNotFound(f"no KV held for request {handle.request_id!r}")
        if block_ids != list(handle.block_ids):
            raise KVStaleHandle(f"request {handle.request_id!r} holds blocks {block_ids}, "
                                f"handle names {handle.block_ids}")
        if not 0 <= start_block <= len(block_ids):
            raise ValueError(f"start_block {start_block} outside [0, {len(block_ids)}]")
        return self.kv_cache.export_blocks(block_ids[start_block:])
