"""The holder's end of the KV pairs (lifecycle: kvtransfer/nccl_pairs.py): a
rendezvous store, a control listener, one thread per pair serving its pulls."""

from __future__ import annotations

import datetime
import itertools
import logging
import pickle
import socket
import threading
import time
from collections import deque
from typing import Callable

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle, KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.pair_channel import Channel
from kvtransfer.pair_control import backend_name, host_id, recv_msg, send_msg

log = logging.getLogger(__name__)


class PairHost:
    """The holder's end: a rendezvous store, a control listener, one thread per pair.

    ``export(handle, start_block) -> tensor`` is called on pair threads."""

    def __init__(self, export: Callable[[KVHandle, int], torch.Tensor], device: torch.device,
                 host: str = "127.0.0.1", timeout_s: float = 120.0):
        from torch.distributed import TCPStore

        self.export, self.device, self.timeout_s = export, torch.device(device), timeout_s
        self.store = TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        self.store_address = f"{host}:{self.store.port}"
        self._listener = socket.create_server((host, 0))
        self.store.set("info", pickle.dumps({"host_id": host_id(), "backend": backend_name(self.device),
                                             "control_port": self._listener.getsockname()[1]}))
        self.pairs: dict[int, "_HostPair"] = {}
        # the last pulls' phases in ms (benchmarks/kv_transfer.py reports them): ``wake`` PULL
        # sent by the receiver → read here (one monotonic clock per host), ``export`` the
        # export's host time, ``posted`` PULL read → send posted, ``sent`` → send completed
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
                msg = recv_msg(self.sock)
                if msg[0] == "bye":
                    break
                _, handle, start_block, nbytes, sent_at = msg
                self._serve(handle, start_block, nbytes, sent_at)
        except (ConnectionError, OSError, EOFError):
            pass                                                    # the receiver left
        except Exception:
            log.exception("kv pair %d with %s failed", self.pair_id, self.peer)
        finally:
            self.shutdown()

    def _serve(self, handle: KVHandle, start_block: int, nbytes: int, sent_at: float) -> None:
        t_in = time.perf_counter()
        ch = self.channel
        reply = ("ok",)
        try:
            with ch.after_engine():    # export on the pair's stream, after the engine's writes
                data = self.host.export(handle, start_block)
            buf = data.to(ch.device).contiguous().view(-1).view(torch.uint8)
            if buf.numel() != nbytes:
                raise KVTransferError(f"holder has {buf.numel()} bytes for {handle.request_id!r} "
                                      f"blocks [{start_block}:], the receiver expects {nbytes}")
        except Exception as e:
            kind = "not_found" if isinstance(e, KVNotFound) else "stale" if isinstance(e, KVStaleHandle) else "error"
            reply = ("err", kind, str(e) or type(e).__name__)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=ch.device)   # keeps the pair in step
        t_exported = time.perf_counter()
        work = ch.post("send", buf)
        t_posted = time.perf_counter()
        send_msg(self.sock, reply)            # the receiver reads it once the bytes landed
        ch.finish(work)
        self.host.timings.append(dict(
            wake=1e3 * (t_in - sent_at), export=1e3 * (t_exported - t_in), posted=1e3 * (t_posted - t_in),
            sent=1e3 * (time.perf_counter() - t_posted), nbytes=nbytes))

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

