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
import math
import pickle
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle, KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.pair_channel import Channel
from kvtransfer.pair_control import backend_name, connect, host_id, peer_closed, recv_msg, send_msg
from kvtransfer.pair_host import PairHost

_SPIN_S = 0.005        # a pull polls its bytes without sleeping this long (1 GB lands in ~3 ms on NVLink)
_POLL_S = 0.0002       # then every this often, also checking that the holder is still there
_ERRORS = {"not_found": KVNotFound, "stale": KVStaleHandle}


class NoPath(Exception):
    """No pair can be built with this holder; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason



# ---- receiver side (the holder's: kvtransfer/pair_host.py) ------------------------------

@dataclass
class PullResult:
    data: torch.Tensor      # the holder's wire shape, on the receiver's device
    seconds: float          # recv posted → bytes landed
    phases: dict            # ms: post_recv (recv posted + PULL pickled), landed (PULL sent → bytes
                            # seen), finish (stream ordering + reading the reply)


class ClientPair:
    """The receiver's end of one pair: built and closed on its own thread, pulled
    from the event loop."""

    def __init__(self, name: str, store_address: str, device: torch.device, timeout_s: float):
        self.name, self.store_address, self.device, self.timeout_s = name, store_address, device, timeout_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kv-nccl-rx")
        self.channel: Channel | None = None
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
        self.sock = connect(host, info["control_port"], 10)
        send_msg(self.sock, ("hello", self.name))
        _, self.pair_id = recv_msg(self.sock)
        self.channel = Channel(store, self.store_address, self.pair_id, 1, self.device, self.timeout_s)
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
                t_ask = time.perf_counter()
                send_msg(self.sock, ("pull", slim, start_block, nbytes, t_ask))
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
                    if peer_closed(self.sock):
                        raise ConnectionError("the holder closed the pair")
                    await asyncio.sleep(_POLL_S)
                t_landed = time.perf_counter()
                seconds = t_landed - t0
                if done is not None:
                    self.channel.finish(work)               # orders the caller's stream after the bytes
                reply = recv_msg(self.sock)
                phases = dict(post_recv=1e3 * (t_ask - t0), landed=1e3 * (t_landed - t_ask),
                              finish=1e3 * (time.perf_counter() - t_landed))
            except Exception as e:
                await loop.run_in_executor(self.executor, self.close, True)
                raise KVTransferError(f"pair with {self.store_address} broke during a pull: {e}") from None
        if reply[0] != "ok":
            _, kind, message = reply
            raise _ERRORS.get(kind, KVTransferError)(message)
        return PullResult(buf.view(dtype).view(shape), seconds, phases)

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


__all__ = ["NoPath", "PairHost", "PairClient", "ClientPair", "PullResult"]
