r"""Sender/receiver interfaces shared by every KV transport.

Lifecycle of one transfer (either side):

    PENDING --start(handle)--> TRANSFERRING --(all bytes verified)--> DONE
                                      \--(error, bad checksum, abort())--> FAILED

The receiver is the active side (the decode worker pulls): ``start(handle,
start_block)`` launches an asyncio task in the running loop; ``poll()`` reads
the state without blocking; ``await wait()`` waits for DONE/FAILED;
``result()`` hands over the ``[L, 2, n, bs, KH, D]`` tensor once DONE (full
heads: a TP=k holder's head shards are merged by ``kvtransfer.relayout``). A
receiver never touches an engine: the caller imports the result, so a failed
transfer can never leave half-written blocks behind.

The sender serves a ``KVSource`` (the holder's blocks) for one transfer; the
transport decides who creates it (the gRPC servicer per PullKV call, the local
receiver directly).

Every transfer is timed and counted in ``TransferStats`` (bytes, chunks,
seconds, GB/s).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout

log = logging.getLogger(__name__)


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class KVTransferError(RuntimeError):
    """A transfer failed (network, checksum, truncated stream, unknown transport)."""


class KVNotFound(KVTransferError):
    """The holder has nothing under that request id (released, aborted, expired)."""


class KVStaleHandle(KVTransferError):
    """The holder's blocks for that request differ from the handle's."""


@dataclass
class TransferStats:
    num_bytes: int = 0
    num_chunks: int = 0
    num_blocks: int = 0
    seconds: float = 0.0
    transport: str = ""           # the transport that moved the bytes (after any fallback)
    fallback_reason: str = ""     # why a requested transport fell back to another ("" = it did not)

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class KVSource(Protocol):
    """The holder's side: what a sender reads blocks from."""
    layout: KVLayout

    async def export(self, handle: KVHandle, start_block: int) -> torch.Tensor:
        """``[L, 2, len(handle.block_ids) - start_block, bs, KH, D]`` of the held blocks.
        Raises KVNotFound, KVStaleHandle, or ValueError (start_block out of range)."""


class _Transfer(ABC):
    """State, error, timing and abort shared by senders and receivers."""

    def __init__(self) -> None:
        self.state = TransferState.PENDING
        self.error: str | None = None
        self.stats = TransferStats()
        self.handle: KVHandle | None = None
        self.start_block = 0
        self._t0 = 0.0
        self._task: asyncio.Task | None = None

    def poll(self) -> TransferState:
        return self.state

    def _begin(self, handle: KVHandle, start_block: int) -> None:
        if self.state is not TransferState.PENDING:
            raise KVTransferError("a transfer object is single-use: start() was already called")
        if not 0 <= start_block <= len(handle.block_ids):
            raise ValueError(f"start_block {start_block} outside [0, {len(handle.block_ids)}]")
        self.handle, self.start_block = handle, start_block
        self.stats.num_blocks = len(handle.block_ids) - start_block
        self.state = TransferState.TRANSFERRING
        self._t0 = time.perf_counter()

    def _finish(self, error: str | None = None) -> None:
        if self.state.is_final:
            return
        self.stats.seconds = time.perf_counter() - self._t0
        self.state = TransferState.FAILED if error else TransferState.DONE
        self.error = error
        rid = self.handle.request_id if self.handle else "?"
        if error:
            log.warning("kv %s %s failed after %.3fs: %s", type(self).__name__, rid, self.stats.seconds, error)
        else:
            log.debug("kv %s %s: %d blocks, %d bytes in %.4fs (%.3f GB/s)", type(self).__name__, rid,
                      self.stats.num_blocks, self.stats.num_bytes, self.stats.seconds, self.stats.gbps)

    def abort(self) -> None:
        """Stop the transfer; it ends FAILED ("aborted") unless it already ended."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._finish("aborted")

    async def wait(self, timeout: float | None = None) -> TransferState:
        """Wait until DONE or FAILED (a timeout aborts the transfer)."""
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self.abort()
                self.error = f"timed out after {timeout}s"
        return self.state


class KVSender(_Transfer):
    """Serves one transfer of ``source``'s blocks."""

    def __init__(self, source: KVSource) -> None:
        super().__init__()
        self.source = source

    @abstractmethod
    def start(self, handle: KVHandle, start_block: int = 0) -> None: ...


class KVReceiver(_Transfer):
    """Pulls one handle's blocks [start_block:] into a tensor of ``local_layout``."""

    def __init__(self, local_layout: KVLayout) -> None:
        super().__init__()
        self.local_layout = local_layout
        self._result: torch.Tensor | None = None

    def start(self, handle: KVHandle, start_block: int = 0) -> None:
        """Check layouts (KVLayoutError at once), then pull in a background task
        of the running event loop."""
        self.local_layout.check_compatible(handle.layout)
        self._begin(handle, start_block)
        self._task = asyncio.get_running_loop().create_task(self._guarded_run())

    async def _guarded_run(self) -> None:
        try:
            if self.stats.num_blocks == 0:
                data = torch.empty(self.local_layout.export_shape(0), dtype=getattr(torch, self.local_layout.dtype))
            else:
                from kvtransfer.relayout import to_local
                data = to_local(await self._run(), self.handle.layout, self.stats.num_blocks)
        except asyncio.CancelledError:
            self._finish("aborted")
            raise
        except Exception as e:  # every failure ends the transfer, never the caller
            self._finish(str(e) or type(e).__name__)
            return
        if not self.state.is_final:
            self._result = data
            self._finish()

    @abstractmethod
    async def _run(self) -> torch.Tensor:
        """Pull the blocks in the holder's wire shape (``handle.layout.wire_shape``);
        raise on any failure. Update ``self.stats`` as bytes arrive."""

    def result(self) -> torch.Tensor:
        if self.state is not TransferState.DONE or self._result is None:
            raise KVTransferError(f"no KV to import: transfer is {self.state.value}"
                                  + (f" ({self.error})" if self.error else ""))
        return self._result
