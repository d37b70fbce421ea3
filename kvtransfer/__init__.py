"""KV transfer between workers: KVLayout, KVHandle, sender/receiver interfaces,
and the transports (``local``, ``grpc``; ``nccl`` has a seat in the registry).

The types import without torch (the router uses them); everything that moves
tensors loads lazily.
"""

from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout, KVLayoutError

__all__ = ["KVHandle", "KVLayout", "KVLayoutError", "TransferState", "TransferStats", "KVReceiver",
           "KVSender", "KVSource", "KVTransferError", "get_transport", "make_receiver"]

_LAZY = {
    "TransferState": "kvtransfer.base", "TransferStats": "kvtransfer.base", "KVReceiver": "kvtransfer.base",
    "KVSender": "kvtransfer.base", "KVSource": "kvtransfer.base", "KVTransferError": "kvtransfer.base",
    "get_transport": "kvtransfer.registry", "make_receiver": "kvtransfer.registry",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
