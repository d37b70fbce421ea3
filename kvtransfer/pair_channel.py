"""The backend of one KV pair (kvtransfer/nccl_pairs.py): a two-rank
torch.distributed backend on ``PrefixStore("pair/<id>/")`` and, on CUDA, its own
stream ordered after the engine's writes."""

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
    def after_engine(self):
        """On CUDA: run the block on the pair's stream, after the device's default
        stream (the engine's writes). On CPU: as is."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.default_stream(self.device))
            yield

    def post(self, op: str, buf: torch.Tensor):
        """Post a send or recv of ``buf``; returns the Work (call ``finish`` on it)."""
        with self.after_engine():
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
        one = torch.zeros(1, device=self.device)
        self.finish(self.post("send" if rank == 0 else "recv", one))

    def close(self, abort: bool = False) -> None:
        """Shut the backend down; ``abort`` when work may be pending (the peer vanished
        mid-transfer): a graceful shutdown could wait for it forever."""
        try:
            self.pg.abort() if abort else self.pg.shutdown()
        except Exception:    # backend without shutdown/abort, or already aborted
            pass

