"""Exports made ahead of their pull, on the holder (prefill) side.

A prefill worker knows a request's KV will be pulled the moment the request is
held. Exporting it then — on the engine thread, queued on the engine's stream
right behind the forward that wrote it — takes the export (gather into one
contiguous tensor) and the hop to the engine thread off the pull's path: the
pair thread finds the tensor here and posts its send at once. Without staging a
pull waits for the engine thread to finish its current step before the export
can even start.

Lifecycle of an entry: ``put(request_id, block_ids, tensor)`` (engine thread,
right after the export on its stream: records a CUDA event there; refused beyond
``budget_bytes``) → ``take(handle, start_block)`` → ``StagedExport`` (a pair
thread; pops it when the handle names the same blocks from block 0 — otherwise
None and the caller exports as usual; the send waits for ``ready`` only, not for
whatever the engine has queued since) or ``retain(live_ids)`` drops it once the request
is no longer held (released, expired, aborted). Thread-safe.

Decision: the staged tensor is a copy, so it stays valid even if the hold ends
while a pull is using it; the memory is outside the KV pool, bounded by the
budget (default 1 GiB per worker, within ``gpu_memory_utilization``'s headroom).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvtransfer.handle import KVHandle


@dataclass
class StagedExport:
    tensor: torch.Tensor
    ready: object = None      # torch.cuda.Event recorded after the export (None on CPU)


class StagedExports:
    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget_bytes = budget_bytes
        self.num_bytes = 0
        self.hits = 0
        self._entries: dict[str, tuple[list[int], StagedExport]] = {}
        self._lock = threading.Lock()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        return self.num_bytes + nbytes <= self.budget_bytes

    def put(self, request_id: str, block_ids: list[int], tensor: torch.Tensor) -> bool:
        """Call on the thread whose current stream made ``tensor`` (right after)."""
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            if request_id in self._entries or not self.fits(size):
                return False
            ready = None
            if tensor.is_cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(tensor.device))
            self._entries[request_id] = (list(block_ids), StagedExport(tensor, ready))
            self.num_bytes += size
            return True

    def take(self, handle: KVHandle, start_block: int) -> StagedExport | None:
        with self._lock:
            entry = self._entries.get(handle.request_id)
            if entry is None or start_block != 0 or entry[0] != list(handle.block_ids):
                return None
            self._pop(handle.request_id)
            self.hits += 1
            return entry[1]

    def retain(self, live_ids) -> None:
        """Drop the entries whose request is not in ``live_ids`` any more."""
        with self._lock:
            for rid in [r for r in self._entries if r not in live_ids]:
                self._pop(rid)

    def _pop(self, request_id: str) -> None:
        _, staged = self._entries.pop(request_id)
        self.num_bytes -= staged.tensor.numel() * staged.tensor.element_size()
