"""Every Redis key pattern Baton uses, in one place.

Layout (``ns`` is the cluster namespace, default ``baton``; a model name keeps
two models' indexes apart):

- ``{ns}:workers`` — hash: worker_id → JSON ``WorkerInfo`` (role, address, epoch, ...).
- ``{ns}:alive:{worker_id}`` — string epoch, with a TTL; refreshed by heartbeats.
  A worker whose alive key expired is dead; its index entries are ignored.
- ``{ns}:blk:{model}:{block_hash:016x}`` — hash: worker_id → epoch. The worker
  holds the block (cached or in use) under that epoch.
- ``{ns}:wblk:{worker_id}`` — set of the block-hash keys the worker wrote, so its
  entries can be dropped in one go when it leaves.
"""

from __future__ import annotations

DEFAULT_NAMESPACE = "baton"


def workers_key(ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:workers"


def alive_key(worker_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:alive:{worker_id}"


def block_key(model: str, block_hash: int, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:blk:{model}:{block_hash:016x}"


def worker_blocks_key(worker_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:wblk:{worker_id}"
