"""The backend of one KV pair (kvtransfer/nccl_pairs.py): a two-rank
torch.distributed backend on ``PrefixStore("pair/<id>/")`` and, on CUDA, its own
stream.

Stream invariant: a transfer waits for exactly what it needs, never for the
engine's whole default stream unless it must — a receive buffer is allocated on
the pair's stream (nothing to wait for) and handed to the default stream when it
lands; a staged export waits for its own recorded event; only an export made on
demand waits for the engine's stream (its blocks may still be being written)."""

from __future__ import annotations

import datetime
from contextlib import contextmanager
from typing import Callable

import torch


class Channel:
    """One pair's backend and stream: ``send``/``recv`` of one contiguous tensor."""

    def __init__(self, store, store_address: str, pair_id: int, rank: int, device: torch.device,
                 timeout_s: float):
        from engine.distributed import make_backend
        from torch.distributed import PrefixStore

        self.device, self.peer = device, 1 - rank
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(device)
            self.stream = torch.cuda.Stream(device)
        self.pg = make_backend(PrefixStore(f"pair/{pair_id}/", store), rank, 2, device,
                               datetime.timedelta(seconds=timeout_s), name=f"kv-pair-{store_address}-{pair_id}")

    @contextmanager
    def on_stream(self):
        """On CUDA: run the block with the pair's stream current (what a send or
        recv posted here waits for; where its buffers are allocated)."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def wait_engine(self) -> None:
        """Order the pair's stream after all the work on the device's default stream
        so far (the engine's): an export of blocks the engine may still be writing."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.default_stream(self.device))

    def wait_event(self, ready) -> None:
        """Order the pair's stream after one recorded event only (a staged export)."""
        if self.cuda and ready is not None:
            self.stream.wait_event(ready)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A buffer owned by the pair's stream: a recv into it waits for nothing else
        (a recv posted after the engine's stream would wait for its current step)."""
        with self.on_stream():
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def hand_over(self, buf: torch.Tensor) -> None:
        """A received buffer goes to users on the default stream: its memory is not
        reused before their work queued by the time it is freed has run."""
        if self.cuda:
            buf.record_stream(torch.cuda.default_stream(self.device))

    def post(self, op: str, buf: torch.Tensor):
        """Post a send or recv of ``buf``, ordered after the pair's stream only;
        returns the Work (``probe`` or ``finish`` it)."""
        with self.on_stream():
            return getattr(self.pg, op)([buf], self.peer, 0)

    def finish(self, work) -> None:
        if not self.cuda:
            work.wait()
            return
        with torch.cuda.stream(self.stream):
            work.wait()
        self.stream.synchronize()

    def probe(self, work) -> Callable[[], bool] | None:
        """A non-blocking "has ``work`` completed on the device?" (event loops poll it
        instead of parking a thread: a thread wake-up costs ~0.1 ms on some VMs). It
        orders no stream after the work, so later work on this pair's stream (the
        next batch's export) still overlaps this transfer. None for gloo, whose p2p
        work completes only through ``wait``."""
        return work.is_completed if self.cuda else None

    def warm_up(self, rank: int) -> None:
        self.finish(self.post("send" if rank == 0 else "recv", self.empty(4)))

    def close(self, abort: bool = False) -> None:
        """Shut the backend down; ``abort`` when work may be pending (the peer vanished
        mid-transfer): a graceful shutdown could wait for it forever."""
        try:
            self.pg.abort() if abort else self.pg.shutdown()
        except Exception:    # backend without shutdown/abort, or already aborted
            pass

