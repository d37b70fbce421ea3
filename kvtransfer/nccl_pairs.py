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
  → pulls, in batches, in order: pulls queue on the receiver; its pump takes
    what is queued (up to ``_MAX_BATCH_BYTES``), posts one ``recv`` of all
    their bytes (``pair_control.batch_layout``), then sends ``PULL([(handle,
    start_block, nbytes), ...])`` on the control socket; the holder exports each
    into that layout, replies ``DONE([ok | err, ...])`` and posts one ``send`` of
    exactly those bytes — a failed export's slot is left unwritten, so the pair
    stays in step; the receiver polls for the bytes from its event loop, reads
    the reply and hands each pull its slice. Up to ``_DEPTH`` batches are in
    flight: the holder does not wait for a send before serving the next PULL
  → teardown: either side closes its control socket (``close()``, process
    exit or crash); the other side reads EOF and shuts its backend down.

Decision: a pull waits for its whole batch (≤ 256 MiB, under 1 ms on NVLink);
in exchange, concurrent pulls pay the fixed host work of a pull (most of the
half millisecond of Python on each side) once per batch.

Streams: on CUDA each pair sends/receives on its own stream, which first
waits for the device's default stream (the engine's KV writes), so a
transfer never stalls the engine's kernels. Each pair thread sets its device.
"""

from __future__ import annotations

import datetime
import math
import pickle
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import torch

from kvtransfer.base import KVNotFound, KVStaleHandle, KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.pair_channel import Channel
from kvtransfer.pair_control import (backend_name, batch_layout, connect, host_id, peer_closed, recv_msg,
                                     send_msg)
from kvtransfer.pair_host import PairHost

_SPIN_S = 0.005        # a pull polls its bytes without sleeping this long (1 GB lands in ~3 ms on NVLink)
_POLL_S = 0.0002       # then every this often, also checking that the holder is still there
_DEPTH = 3             # batches in flight per pair: the next two are asked for while one lands
_MAX_BATCH_BYTES = 256 << 20    # a batch takes queued pulls up to this many bytes (at least one pull)
_ERRORS = {"not_found": KVNotFound, "stale": KVStaleHandle}


class NoPath(Exception):
    """No pair can be built with this holder; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason



# ---- receiver side (the holder's: kvtransfer/pair_host.py) ------------------------------

@dataclass
class PullResult:
    data: torch.Tensor      # the holder's wire shape, on the receiver's device (a view of its batch's buffer)
    seconds: float          # its batch: recv posted → bytes landed
    phases: dict            # ms: queued (pull() → its batch posted), post_recv (recv posted), landed
                            # (PULL sent → bytes seen), finish (reading the reply), launch (the
                            # batch's host work: recv posted + PULL pickled and sent);
                            # batch: how many pulls shared the send


@dataclass
class _Pull:
    handle: KVHandle
    start_block: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    future: "asyncio.Future"
    queued_at: float


@dataclass
class _Batch:
    pulls: list[_Pull]
    buf: torch.Tensor
    work: object
    done: Callable[[], bool] | None
    posted_at: float
    asked_at: float
    launched_at: float


class ClientPair:
    """The receiver's end of one pair: built and closed on its own thread, pulled
    from the event loop.

    Pulls queue; a pump task on the pulling loop turns what is queued into
    batches (one recv, one PULL naming every pull, up to ``_MAX_BATCH_BYTES``)
    and keeps up to ``_DEPTH`` batches in flight, so one batch's export and host
    work overlap the previous one's bytes on the wire. Batches complete in the
    order they were posted (one NCCL stream per pair, the holder serves PULLs in
    order)."""

    def __init__(self, name: str, store_address: str, device: torch.device, timeout_s: float):
        self.name, self.store_address, self.device, self.timeout_s = name, store_address, device, timeout_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kv-nccl-rx")
        self.channel: Channel | None = None
        self.sock: socket.socket | None = None
        self.pair_id = 0
        self.broken = False
        self._closed = False
        self._queue: deque[_Pull] = deque()
        self._launching: list[_Pull] = []
        self._pump = None                 # the pump task, on the loop that pulls
        self._pump_loop = None

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
        """One pull: queued for the pump, which sends it in the next batch. A
        cancelled caller's pull still runs to its end (the pair stays in step);
        only its result is dropped."""
        import asyncio
        if self.broken:
            raise KVTransferError(f"the pair with {self.store_address} is closed")
        loop = asyncio.get_running_loop()
        nbytes = math.prod(shape) * dtype.itemsize
        future = loop.create_future()
        self._queue.append(_Pull(handle, start_block, nbytes, tuple(shape), dtype, future, time.perf_counter()))
        if self._pump is None or self._pump.done() or self._pump_loop is not loop:
            self._pump, self._pump_loop = loop.create_task(self._run_pump()), loop
        return await future

    async def _run_pump(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        inflight: deque[_Batch] = deque()
        try:
            while self._queue or inflight:
                while self._queue and len(inflight) < _DEPTH:
                    inflight.append(self._launch())
                batch = inflight[0]
                if batch.done is None:                      # gloo (CPU tests): wait on the pair's thread
                    await loop.run_in_executor(self.executor, self.channel.finish, batch.work)
                head_at = time.perf_counter()               # spin from when it is the oldest batch
                while batch.done is not None and not batch.done():
                    now = time.perf_counter()
                    if now - batch.posted_at > self.timeout_s:
                        raise TimeoutError(f"no KV after {self.timeout_s}s")
                    if now - head_at < _SPIN_S:
                        await asyncio.sleep(0)
                    else:
                        if peer_closed(self.sock):
                            raise ConnectionError("the holder closed the pair")
                        await asyncio.sleep(_POLL_S)
                    if self._queue and len(inflight) < _DEPTH:
                        inflight.append(self._launch())
                landed_at = time.perf_counter()
                reply = recv_msg(self.sock)               # sent before the holder's send: waiting
                inflight.popleft()
                self._resolve(batch, reply, landed_at)
        except Exception as e:
            error = KVTransferError(f"pair with {self.store_address} broke during a pull: {e}")
            self.broken = True                              # refuses new pulls from here on
            for pull in [p for b in inflight for p in b.pulls] + self._launching + list(self._queue):
                if not pull.future.done():
                    pull.future.set_exception(error)
            self._queue.clear()
            await loop.run_in_executor(self.executor, self.close, True)

    def _launch(self) -> _Batch:
        """Post one recv for the queued pulls (up to the batch cap), then ask."""
        pulls = [self._queue.popleft()]
        total = pulls[0].nbytes
        while self._queue and total + self._queue[0].nbytes <= _MAX_BATCH_BYTES:
            total += self._queue[0].nbytes
            pulls.append(self._queue.popleft())
        self._launching = pulls                             # failed with the pair if posting fails
        _, size = batch_layout([p.nbytes for p in pulls])
        buf = self.channel.empty(size)
        posted_at = time.perf_counter()
        work = self.channel.post("recv", buf)               # posted before asking: the send lands at once
        asked_at = time.perf_counter()
        items = [(replace(p.handle, prompt_token_ids=[]), p.start_block, p.nbytes) for p in pulls]
        send_msg(self.sock, ("pull", items, asked_at))
        self._launching = []
        return _Batch(pulls, buf, work, self.channel.probe(work), posted_at, asked_at, time.perf_counter())

    def _resolve(self, batch: _Batch, reply, landed_at: float) -> None:
        _, outcomes = reply
        offsets, _ = batch_layout([p.nbytes for p in batch.pulls])
        self.channel.hand_over(batch.buf)
        now = time.perf_counter()
        for pull, offset, outcome in zip(batch.pulls, offsets, outcomes):
            if pull.future.done():
                continue
            if outcome[0] != "ok":
                _, kind, message = outcome
                pull.future.set_exception(_ERRORS.get(kind, KVTransferError)(message))
                continue
            data = batch.buf[offset:offset + pull.nbytes].view(pull.dtype).view(pull.shape)
            phases = dict(queued=1e3 * (batch.posted_at - pull.queued_at),
                          post_recv=1e3 * (batch.asked_at - batch.posted_at),
                          landed=1e3 * (landed_at - batch.asked_at), finish=1e3 * (now - landed_at),
                          launch=1e3 * (batch.launched_at - batch.posted_at),
                          batch=len(batch.pulls))
            pull.future.set_result(PullResult(data, landed_at - batch.posted_at, phases))

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = self.broken = True
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
