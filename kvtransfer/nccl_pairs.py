"""Pair communicators between a KV holder (prefill worker) and a receiver (decode worker).

One torch.distributed backend per (holder, receiver) pair, created on demand
on a ``PrefixStore`` of a ``TCPStore`` that the holder hosts — never
``init_process_group`` and never one global world, so workers come and go
without touching anybody else's pairs. NCCL between GPUs; gloo between CPU
processes only where explicitly allowed (tests).

Lifecycle of a pair:
  holder: ``PairHost(export, device)`` — hosts a TCPStore (key ``info``: host
    id, backend, control port) and a control listener, both on free ports;
    ``store_address`` goes into its handles (``KVHandle.transport_address``)
  → receiver: ``PairClient(device).pair_for(store_address)`` — reads ``info``
    (another host or another backend → ``NoPath``, the caller falls back),
    connects the control socket, says hello; the holder answers a pair id;
    both build the backend on ``PrefixStore("pair/<id>/")`` (holder rank 0,
    receiver rank 1) and exchange one element, so the NCCL communicator exists
    before the first pull
  → pulls, one at a time per pair, in order: the receiver posts its ``recv``
    of the expected bytes, then sends ``PULL(handle, start_block, nbytes)`` on
    the control socket; the holder exports the blocks (one contiguous tensor),
    replies ``OK`` or ``ERR`` and posts one ``send`` of exactly ``nbytes`` — a
    dummy of that size when the export failed, so the pair stays in step; the
    receiver polls for the bytes from its event loop, then reads the reply
  → teardown: either side closes its control socket (``close()``, process
    exit or crash); the other side reads EOF and shuts its backend down.

Streams: on CUDA each pair sends/receives on its own stream, which first
waits for the device's default stream (the engine's KV writes), so a
transfer never stalls the engine's kernels. Each pair thread sets its device.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
import pickle
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle, KVTransferError
from kvtransfer.handle import KVHandle

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_SPIN_S = 0.005        # a pull polls its bytes without sleeping this long (1 GB lands in ~3 ms on NVLink)
_POLL_S = 0.0002       # then every this often, also checking that the holder is still there
_ERRORS = {"not_found": KVNotFound, "stale": KVStaleHandle}


class NoPath(Exception):
    """No pair can be built with this holder; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def host_id() -> str:
    """Identifies this machine (two workers share GPUs' NVLink only on one host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def backend_name(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# ---- control socket framing ----------------------------------------------------------

def send_msg(sock: socket.socket, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def recv_msg(sock: socket.socket):
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the control connection")
        buf += chunk
    return bytes(buf)


def _peer_closed(sock: socket.socket) -> bool:
    """True once the peer closed the connection (and no message is left unread)."""
    import select
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


# ---- the backend of one pair ----------------------------------------------------------

class _Channel:
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

    def post(self, op: str, buf: torch.Tensor):
        """Post a send or recv of ``buf``; returns the Work (call ``finish`` on it)."""
        if not self.cuda:
            return getattr(self.pg, op)([buf], self.peer, 0)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.default_stream(self.device))   # the engine's writes
            return getattr(self.pg, op)([buf], self.peer, 0)

    def finish(self, work) -> None:
        if not self.cuda:
            work.wait()
            return
        with torch.cuda.stream(self.stream):
            work.wait()
        self.stream.synchronize()

    def probe(self, work) -> Callable[[], bool] | None:
        """A non-blocking "has ``work`` completed?" (event loops poll it instead of
        parking a thread: a thread wake-up costs ~0.1 ms on some VMs). None for
        gloo, whose p2p work completes only through ``wait``."""
        if not self.cuda:
            return None
        with torch.cuda.stream(self.stream):
            work.wait()
            done = torch.cuda.Event()
            done.record(self.stream)
        return done.query

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


# ---- holder side ----------------------------------------------------------------------

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
        self.channel: _Channel | None = None
        self.peer = "?"

    def run(self) -> None:
        try:
            _, self.peer = recv_msg(self.sock)                      # ("hello", receiver name)
            send_msg(self.sock, ("pair", self.pair_id))
            self.channel = _Channel(self.host.store, self.host.store_address, self.pair_id, 0,
                                    self.host.device, self.host.timeout_s)
            self.channel.warm_up(0)
            with self.host._lock:
                self.host.pairs[self.pair_id] = self
            log.info("kv pair %d with %s up (%s)", self.pair_id, self.peer, backend_name(self.host.device))
            while True:
                msg = recv_msg(self.sock)
                if msg[0] == "bye":
                    break
                _, handle, start_block, nbytes = msg
                self._serve(handle, start_block, nbytes)
        except (ConnectionError, OSError, EOFError):
            pass                                                    # the receiver left
        except Exception:
            log.exception("kv pair %d with %s failed", self.pair_id, self.peer)
        finally:
            self.shutdown()

    def _serve(self, handle: KVHandle, start_block: int, nbytes: int) -> None:
        ch = self.channel
        reply = ("ok",)
        try:
            if ch.cuda:    # export on the pair's stream, after the engine's writes
                with torch.cuda.stream(ch.stream):
                    ch.stream.wait_stream(torch.cuda.default_stream(ch.device))
                    data = self.host.export(handle, start_block)
            else:
                data = self.host.export(handle, start_block)
            buf = data.to(ch.device).contiguous().view(-1).view(torch.uint8)
            if buf.numel() != nbytes:
                raise KVTransferError(f"holder has {buf.numel()} bytes for {handle.request_id!r} "
                                      f"blocks [{start_block}:], the receiver expects {nbytes}")
        except Exception as e:
            kind = "not_found" if isinstance(e, KVNotFound) else "stale" if isinstance(e, KVStaleHandle) else "error"
            reply = ("err", kind, str(e) or type(e).__name__)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=ch.device)   # keeps the pair in step
        send_msg(self.sock, reply)            # first: the receiver reads it once the bytes landed
        ch.finish(ch.post("send", buf))

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


# ---- receiver side --------------------------------------------------------------------

@dataclass
class PullResult:
    data: torch.Tensor      # the holder's wire shape, on the receiver's device
    seconds: float          # request sent → bytes landed (on the pair thread)


class ClientPair:
    """The receiver's end of one pair: built and closed on its own thread, pulled
    from the event loop."""

    def __init__(self, name: str, store_address: str, device: torch.device, timeout_s: float):
        self.name, self.store_address, self.device, self.timeout_s = name, store_address, device, timeout_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kv-nccl-rx")
        self.channel: _Channel | None = None
        self.sock: socket.socket | None = None
        self.pair_id = 0
        self.broken = False
        self._lock = None                 # asyncio.Lock of the loop that pulls (pulls run in order)
        self._lock_loop = None

    def open(self, cross_host: bool) -> None:
        from torch.distributed import TCPStore

        host, _, port = self.store_address.rpartition(":")
        try:
            store = TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=10))
            info = pickle.loads(store.get("info"))
        except Exception as e:
            raise NoPath("rendezvous_failed", f"cannot reach the holder's store at {self.store_address}: {e}")
        if info["host_id"] != host_id() and not cross_host:
            raise NoPath("other_host", f"holder {self.store_address} is on another host")
        if info["backend"] != backend_name(self.device):
            raise NoPath("backend_mismatch", f"holder uses {info['backend']}, this receiver "
                                             f"{backend_name(self.device)}")
        self.store = store
        self.sock = _connect(host, info["control_port"], 10)
        send_msg(self.sock, ("hello", self.name))
        _, self.pair_id = recv_msg(self.sock)
        self.channel = _Channel(store, self.store_address, self.pair_id, 1, self.device, self.timeout_s)
        self.channel.warm_up(1)

    async def pull(self, handle: KVHandle, start_block: int, shape: tuple[int, ...],
                   dtype: torch.dtype) -> PullResult:
        """One pull, driven from the event loop: post the recv, ask, poll for the
        bytes (spinning the loop cooperatively for the first ``_SPIN_S``), then read
        the reply the holder sent before its send. Pulls of one pair run in order;
        a cancelled pull still runs to its end (shielded), keeping the pair in step."""
        import asyncio
        return await asyncio.shield(asyncio.ensure_future(self._pull(handle, start_block, shape, dtype)))

    async def _pull(self, handle, start_block, shape, dtype) -> PullResult:
        import asyncio
        import time
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            if self.broken:
                raise KVTransferError(f"the pair with {self.store_address} is closed")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            slim = replace(handle, prompt_token_ids=[])
            t0 = time.perf_counter()
            try:
                work = self.channel.post("recv", buf)       # posted before asking: the send lands at once
                send_msg(self.sock, ("pull", slim, start_block, nbytes))
                done = self.channel.probe(work)
                if done is None:                            # gloo (CPU tests): wait on the pair's thread
                    await loop.run_in_executor(self.executor, self.channel.finish, work)
                while done is not None and not done():
                    waited = time.perf_counter() - t0
                    if waited < _SPIN_S:
                        await asyncio.sleep(0)
                        continue
                    if waited > self.timeout_s:
                        raise TimeoutError(f"no KV after {self.timeout_s}s")
                    if _peer_closed(self.sock):
                        raise ConnectionError("the holder closed the pair")
                    await asyncio.sleep(_POLL_S)
                seconds = time.perf_counter() - t0
                if done is not None:
                    self.channel.finish(work)               # orders the caller's stream after the bytes
                reply = recv_msg(self.sock)
            except Exception as e:
                await loop.run_in_executor(self.executor, self.close, True)
                raise KVTransferError(f"pair with {self.store_address} broke during a pull: {e}") from None
        if reply[0] != "ok":
            _, kind, message = reply
            raise _ERRORS.get(kind, KVTransferError)(message)
        return PullResult(buf.view(dtype).view(shape), seconds)

    def close(self, abort: bool = False) -> None:
        if self.broken:
            return
        self.broken = True
        if self.sock is not None:
            try:
                send_msg(self.sock, ("bye",))
            except OSError:
                pass
            self.sock.close()
        if self.channel is not None:
            self.channel.close(abort)
            self.channel = None


class PairClient:
    """A receiver's pairs, one per holder store address (one per decode worker)."""

    def __init__(self, device: torch.device | str, name: str = "", cross_host: bool = False,
                 timeout_s: float = 120.0):
        self.device = torch.device(device)
        self.name = name or f"{socket.gethostname()}:{id(self):x}"
        self.cross_host, self.timeout_s = cross_host, timeout_s
        self.pairs: dict[str, ClientPair] = {}
        self._opening: dict[str, tuple] = {}      # store address → (pair, its build future)

    async def pair_for(self, store_address: str) -> ClientPair:
        """The open pair with that holder, building it on first use (raises NoPath).
        Concurrent callers for one holder share one build."""
        import asyncio
        pair = self.pairs.get(store_address)
        if pair is not None and not pair.broken:
            return pair
        opening = self._opening.get(store_address)
        if opening is None:
            pair = ClientPair(self.name, store_address, self.device, self.timeout_s)
            built = asyncio.get_running_loop().run_in_executor(pair.executor, pair.open, self.cross_host)
            opening = self._opening[store_address] = (pair, built)
        pair, built = opening
        try:
            await asyncio.shield(built)
        except asyncio.CancelledError:
            raise                          # the build goes on; a later caller picks the pair up
        except BaseException:
            if self._opening.get(store_address) is opening:
                del self._opening[store_address]
                pair.executor.shutdown(wait=False)
            raise
        if self._opening.get(store_address) is opening:
            del self._opening[store_address]
            self.pairs[store_address] = pair
        return pair

    async def pull(self, pair: ClientPair, handle: KVHandle, start_block: int, shape, dtype) -> PullResult:
        try:
            return await pair.pull(handle, start_block, tuple(shape), dtype)
        finally:
            if pair.broken and self.pairs.get(pair.store_address) is pair:
                del self.pairs[pair.store_address]

    def close_pair(self, store_address: str) -> bool:
        pair = self.pairs.pop(store_address, None)
        if pair is None:
            return False
        pair.executor.submit(pair.close).result()
        pair.executor.shutdown(wait=False)
        return True

    def close(self) -> None:
        for address in list(self.pairs):
            self.close_pair(address)
