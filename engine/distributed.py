"""The tensor-parallel group of one engine: this process's rank, the group's size,
and the few collectives a Megatron-sharded model needs.

Lifecycle:
  ``TPGroup.single()`` — TP=1: no process group at all; every collective is the
  identity, so a TP=1 engine runs exactly the single-process code.
  ``TPGroup.connect(address, rank, size, device)`` — TP>1, one call per rank
  process: rank 0 hosts a ``TCPStore`` (``make_store``; port 0 picks a free
  one, which the other ranks are then told), the others connect to it; each rank
  builds two backends on ``PrefixStore``s of that store — *no*
  ``init_process_group`` and no default world (KV transports build their own
  pair groups beside it; see kvtransfer/nccl.py):
    - ``device``: NCCL on CUDA, gloo on CPU — activations (all-reduce, all-gather);
    - ``control``: gloo on CPU — pickled messages from rank 0 (``broadcast_object``).
  → the model's layers receive the group at construction (never read a global)
  → ``close()`` shuts both backends down.

Invariant: every rank issues the same collectives in the same order. The TP
executor (engine/tp_executor.py) guarantees it by replaying rank 0's steps on
every rank.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass, field

import torch

_TIMEOUT = datetime.timedelta(seconds=600)


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds (heads are replicated when ``tp_size > num_kv_heads``)."""
    return max(1, num_kv_heads // tp_size)


def kv_head_start(rank: int, num_kv_heads: int, tp_size: int) -> int:
    """First of the full model's KV heads that ``rank`` holds."""
    replicas = max(1, tp_size // num_kv_heads)
    return (rank // replicas) * local_kv_heads(num_kv_heads, tp_size)


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """Rank r's device when one process sees every GPU of the group: ``cuda:N``
    → ``cuda:N+r``; ``cuda`` → ``cuda:r``; cpu → cpu. (A rank that sees one GPU
    only — a Ray bundle — uses ``cuda:0``.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def make_store(address: str, rank: int, size: int, timeout: datetime.timedelta = _TIMEOUT):
    """Rank 0 hosts a TCPStore on ``host:port`` (port 0 = free port), the others join it."""
    from torch.distributed import TCPStore
    host, _, port = address.rpartition(":")
    return TCPStore(host, int(port), size, rank == 0, timeout=timeout, wait_for_workers=False)


def make_backend(store, rank: int, size: int, device: torch.device, timeout: datetime.timedelta = _TIMEOUT,
                 name: str = "baton"):
    """A c10d backend (NCCL for CUDA, gloo otherwise) on ``store``, no default group involved.

    NCCL note: its watchdog ends the process when an operation outlives
    ``timeout`` (PyTorch's default error handling), so callers shut a backend
    down when they know its peer is gone rather than letting work hang."""
    from torch.distributed import ProcessGroupGloo
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL
        torch.cuda.set_device(device)
        opts = ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.global_ranks_in_group = list(range(size))
        opts.group_name = name
        return ProcessGroupNCCL(store, rank, size, opts)
    return ProcessGroupGloo(store, rank, size, timeout)


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    address: str = ""               # host:port of the rendezvous store (rank 0 hosts it)
    _device_pg: object = None
    _control_pg: object = None
    _store: object = None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "TPGroup":
        return cls(0, 1, torch.device(device))

    @classmethod
    def connect(cls, address: str, rank: int, size: int, device: str | torch.device,
                store=None) -> "TPGroup":
        """Join the group whose store is at ``address`` (blocks until all ranks
        joined). Rank 0 passes the store it hosts (``make_store``: its port is
        known only once it is bound, and the other ranks need it). ``device`` is
        this rank's device (see ``rank_device``)."""
        from torch.distributed import PrefixStore, ProcessGroupGloo
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside [0, {size})")
        if store is None:
            store = make_store(address, rank, size)
        dev = torch.device(device)
        host = address.rpartition(":")[0]
        control = ProcessGroupGloo(PrefixStore("tp/control/", store), rank, size, _TIMEOUT)
        device_pg = make_backend(PrefixStore("tp/device/", store), rank, size, dev, name=f"tp@{address}")
        return cls(rank, size, dev, f"{host}:{store.port}", device_pg, control, store)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    # ---- collectives on activations (device backend) ------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the identity at TP=1)."""
        if self.size > 1:
            self._device_pg.allreduce([x]).wait()
        return x

    def gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """``[size, *x.shape]``: every rank's ``x`` in rank order (on every rank)."""
        if self.size == 1:
            return x.unsqueeze(0)
        x = x.contiguous().view(1, *x.shape)       # gloo wants the ranks' chunks along dim 0
        out = torch.empty((self.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._device_pg._allgather_base(out, x).wait()
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``."""
        if self.size == 1:
            return x
        return torch.cat(self.gather_stack(x).unbind(0), dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape/dtype on every rank), in place."""
        if self.size > 1:
            from torch.distributed import BroadcastOptions
            opts = BroadcastOptions()
            opts.rootRank = 0
            self._device_pg.broadcast([x], opts).wait()
        return x

    # ---- control (gloo, CPU) --------------------------------------------------------
    def broadcast_object(self, obj=None):
        """Rank 0 sends ``obj`` (picklable), every other rank returns it."""
        if self.size == 1:
            return obj
        from torch.distributed import BroadcastOptions
        opts = BroadcastOptions()
        opts.rootRank = 0
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                                       dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._control_pg.broadcast([size], opts).wait()
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._control_pg.broadcast([payload], opts).wait()
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over ranks (e.g. KV blocks that fit on every GPU)."""
        if self.size == 1:
            return value
        from torch.distributed import AllreduceOptions, ReduceOp
        t = torch.tensor([value], dtype=torch.int64)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.MIN
        self._control_pg.allreduce([t], opts).wait()
        return int(t.item())

    def close(self) -> None:
        for name in ("_device_pg", "_control_pg"):
            pg = getattr(self, name)
            if pg is not None:
                try:
                    pg.shutdown()
                except Exception:     # already gone / unsupported by this backend
                    pass
                setattr(self, name, None)
        self._store = None
