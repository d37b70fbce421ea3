"""The holder's end of the KV pairs (lifecycle: kvtransfer/nccl_pairs.py): a
rendezvous store, a control listener, one thread per pair serving its pulls."""

from __future__ import annotations

import datetime
import itertools
import logging
import pickle
import select
import socket
import threading
import time
from collections import deque
from typing import Callable

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle, KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.pair_channel import Channel
from kvtransfer.pair_control import backend_name, batch_layout, host_id, recv_msg, send_msg

log = logging.getLogger(__name__)

_RETIRE_POLL_S = 0.0005    # while sends are in flight, how often the pair thread checks on them


def export_part(take_staged, export, handle: KVHandle, start_block: int, wait_event, wait_engine) -> torch.Tensor:
    """One pull's tensor, on a pair thread with the pair's stream current: the staged
    export when ``take_staged`` has it (the stream waits for its ready event only),
    else ``export`` made now, after ``wait_engine()``."""
    staged = take_staged(handle, start_block) if take_staged is not None else None
    if staged is not None:
        wait_event(staged.ready)
        return staged.tensor
    wait_engine()
    return export(handle, start_block)


class PairHost:
    """The holder's end: a rendezvous store, a control listener, one thread per pair.

    ``export(handle, start_block) -> tensor`` and ``take_staged(handle, start_block)
    -> StagedExport | None`` (kvtransfer/staging.py) are called on pair threads."""

    def __init__(self, export: Callable[[KVHandle, int], torch.Tensor], device: torch.device,
                 host: str = "127.0.0.1", timeout_s: float = 120.0, take_staged: Callable | None = None):
        from torch.distributed import TCPStore

        self.export, self.take_staged = export, take_staged
        self.device, self.timeout_s = torch.device(device), timeout_s
        self.store = TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        self.store_address = f"{host}:{self.store.port}"
        self._listener = socket.create_server((host, 0))
        self.store.set("info", pickle.dumps({"host_id": host_id(), "backend": backend_name(self.device),
                                             "control_port": self._listener.getsockname()[1]}))
        self.pairs: dict[int, "_HostPair"] = {}
        # the last batches' phases in ms (benchmarks/kv_transfer.py reports them): ``wake`` PULL
        # sent by the receiver → read here (one monotonic clock per host), ``export`` the
        # exports' host time (``gather`` of it: packing the parts into one buffer), ``posted``
        # PULL read → send posted, ``sent`` → send seen
        # completed (on CUDA within ``_RETIRE_POLL_S``); ``batch`` pulls in it
        self.timings: deque[dict] = deque(maxlen=256)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="kv-nccl-accept", daemon=True).start()

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _HostPair(self, sock, next(self._ids))
            threading.Thread(target=pair.run, name=f"kv-nccl-pair-{pair.pair_id}", daemon=True).start()

    def close(self) -> None:
        """Tear every pair down (receivers see EOF) and stop listening."""
        self._closed = True
        self._listener.close()
        with self._lock:
            pairs = list(self.pairs.values())
        for pair in pairs:
            pair.shutdown()


class _HostPair:
    def __init__(self, host: PairHost, sock: socket.socket, pair_id: int):
        self.host, self.sock, self.pair_id = host, sock, pair_id
        self.channel: Channel | None = None
        self.peer = "?"
        self.inflight: deque = deque()        # (done?, tensors, timing) per send not yet completed

    def run(self) -> None:
        try:
            _, self.peer = recv_msg(self.sock)                      # ("hello", receiver name)
            send_msg(self.sock, ("pair", self.pair_id))
            self.channel = Channel(self.host.store, self.host.store_address, self.pair_id, 0,
                                    self.host.device, self.host.timeout_s)
            self.channel.warm_up(0)
            with self.host._lock:
                self.host.pairs[self.pair_id] = self
            log.info("kv pair %d with %s up (%s)", self.pair_id, self.peer, backend_name(self.host.device))
            while True:
                msg = self._next_message()
                if msg[0] == "bye":
                    break
                _, items, sent_at = msg
                self._serve(items, sent_at)
        except (ConnectionError, OSError, EOFError):
            pass                                                    # the receiver left
        except Exception:
            log.exception("kv pair %d with %s failed", self.pair_id, self.peer)
        finally:
            self.shutdown()

    def _next_message(self):
        """The next control message; while sends are in flight, poll for it and
        retire the sends that completed (their buffers live until then)."""
        while self.inflight:
            self._retire()
            if self.inflight and select.select([self.sock], [], [], _RETIRE_POLL_S)[0]:
                break
        return recv_msg(self.sock)

    def _retire(self) -> None:
        while self.inflight and self.inflight[0][0]():
            done, _, timing = self.inflight.popleft()
            timing["sent"] = 1e3 * time.perf_counter() - timing.pop("_posted_at")
            self.host.timings.append(timing)

    def _serve(self, items: list, sent_at: float) -> None:
        """One batch: export each pull into its slot, reply, post one send."""
        t_in = time.perf_counter()
        ch = self.channel
        offsets, total = batch_layout([nbytes for _, _, nbytes in items])
        outcomes, parts = [], []
        waited_engine = [False]

        def wait_engine():               # once per batch, and only for an export made now
            if not waited_engine[0]:
                ch.wait_engine()
                waited_engine[0] = True
        with ch.on_stream():
            for handle, start_block, nbytes in items:
                try:
                    part = export_part(self.host.take_staged, self.host.export, handle, start_block,
                                       ch.wait_event, wait_engine)
                    if part.device != ch.device or not part.is_contiguous():
                        part = part.to(ch.device).contiguous()
                    part = part.view(-1).view(torch.uint8)
                    if part.numel() != nbytes:
                        raise KVTransferError(f"holder has {part.numel()} bytes for {handle.request_id!r} "
                                              f"blocks [{start_block}:], the receiver expects {nbytes}")
                    outcomes.append(("ok",))
                    parts.append(part)
                except Exception as e:
                    kind = ("not_found" if isinstance(e, KVNotFound) else
                            "stale" if isinstance(e, KVStaleHandle) else "error")
                    outcomes.append(("err", kind, str(e) or type(e).__name__))
                    parts.append(None)
            t_parts = time.perf_counter()
            if len(parts) == 1 and parts[0] is not None:
                buf = parts[0]                                     # one pull: its export is the message
            elif None not in parts and sum(p.numel() for p in parts) == total:
                buf = torch.cat(parts)                             # no gaps in the layout: one copy
            else:
                buf = torch.empty(total, dtype=torch.uint8, device=ch.device)
                for offset, part in zip(offsets, parts):
                    if part is not None:
                        buf[offset:offset + part.numel()].copy_(part)
        t_exported = time.perf_counter()
        work = ch.post("send", buf)
        t_posted = time.perf_counter()
        send_msg(self.sock, ("done", outcomes))   # the receiver reads it once the bytes landed
        timing = dict(wake=1e3 * (t_in - sent_at), export=1e3 * (t_exported - t_in),
                      gather=1e3 * (t_exported - t_parts),
                      posted=1e3 * (t_posted - t_in), nbytes=total, batch=len(items))
        done = ch.probe(work)
        if done is None:                          # gloo: its send completes through wait
            ch.finish(work)
            timing["sent"] = 1e3 * (time.perf_counter() - t_posted)
            self.host.timings.append(timing)
            return
        timing["_posted_at"] = 1e3 * t_posted
        self.inflight.append((done, (buf, parts), timing))   # the tensors stay alive until sent

    def shutdown(self) -> None:
        with self.host._lock:
            mine = self.host.pairs.get(self.pair_id) is self
            if mine:
                del self.host.pairs[self.pair_id]
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
            log.info("kv pair %d with %s down", self.pair_id, self.peer)

