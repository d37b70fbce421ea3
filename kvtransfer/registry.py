"""Transports by name: ``get_transport(handle.transport)``.

A transport is two callables: ``make_receiver(local_layout, **options)`` for
the pulling side, and ``serve(source, ctx)`` which makes a holder's blocks
reachable through it (returns an undo callable). Workers serve every
registered transport and pull with the one the handle names.

Built-ins load on first use: ``local`` (same process), ``grpc`` (any host),
``nccl`` (GPU to GPU through torch.distributed pair groups, falling back to
``grpc`` where there is no NCCL path). A transport that needs its own
rendezvous advertises it in ``ServeContext.advertised[name]``; holders copy
it into ``KVHandle.transport_address``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtransfer.base import KVReceiver, KVSource, KVTransferError
from kvtransfer.layout import KVLayout

_MODULES = {"local": "kvtransfer.local", "grpc": "kvtransfer.grpc_transport", "nccl": "kvtransfer.nccl"}
_TRANSPORTS: dict[str, "Transport"] = {}


@dataclass
class ServeContext:
    """What a transport may attach to on the holder's side, and what it advertises back."""
    address: str                     # host:port the holder advertises
    grpc_server: Any = None          # grpc.aio.Server, before start()
    options: dict = field(default_factory=dict)
    # filled by ``serve``: transport name → the address to put in the holder's handles
    # as ``KVHandle.transport_address`` (nccl: its rendezvous store)
    advertised: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Transport:
    name: str
    make_receiver: Callable[..., KVReceiver]                       # (local_layout, **options)
    serve: Callable[[KVSource, ServeContext], Callable[[], None]]  # -> undo


def register_transport(transport: Transport) -> None:
    _TRANSPORTS[transport.name] = transport


def get_transport(name: str) -> Transport:
    if name not in _TRANSPORTS and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != _MODULES[name]:
                raise
            raise KVTransferError(f"KV transport {name!r} is not implemented yet") from None
    if name not in _TRANSPORTS:
        raise KVTransferError(f"unknown KV transport {name!r} (known: {', '.join(sorted(_MODULES))})")
    return _TRANSPORTS[name]


def available_transports() -> list[str]:
    """Names of the transports that load in this process."""
    names = []
    for name in _MODULES:
        try:
            get_transport(name)
            names.append(name)
        except KVTransferError:
            pass
    return names


def make_receiver(name: str, local_layout: KVLayout, **options) -> KVReceiver:
    return get_transport(name).make_receiver(local_layout, **options)
