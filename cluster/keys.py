"""Every Redis key pattern Baton uses, in one place.

Layout (``ns`` is the cluster namespace, default ``baton``; a model name keeps
two models' indexes apart):

- ``{ns}:workers`` — hash: worker_id → JSON ``WorkerInfo`` (role, address, epoch,
  draining, ...). Written at registration; heartbeats re-create a missing entry
  (``HSETNX``), so a Redis that restarted empty refills itself, while the
  controller's ``draining`` flag is never overwritten.
- ``{ns}:alive:{worker_id}`` — string epoch, with a TTL; refreshed by heartbeats.
  A worker whose alive key expired (or holds another epoch) is dead; its index
  entries are ignored.
- ``{ns}:stats:{worker_id}`` — string JSON of the worker's latest load numbers
  (``num_running``, ``num_waiting``, ``kv_cache_usage``, ...), same TTL as the
  alive key; written by heartbeats, read by ``baton status`` and the router.
- ``{ns}:blk:{model}:{block_hash:016x}`` — hash: worker_id → epoch. The worker
  holds the block (cached or in use) under that epoch.
- ``{ns}:wblk:{worker_id}`` — set of the full block keys (``{ns}:blk:...``) the
  worker wrote, so its entries can be dropped in one go when it leaves.

Values are text: every Baton client is made with ``decode_responses=True``
(see ``cluster.store.connect``).
"""

from __future__ import annotations

DEFAULT_NAMESPACE = "baton"


def workers_key(ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:workers"


def alive_key(worker_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:alive:{worker_id}"


def stats_key(worker_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:stats:{worker_id}"


def block_key(model: str, block_hash: int, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:blk:{model}:{block_hash:016x}"


def worker_blocks_key(worker_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    return f"{ns}:wblk:{worker_id}"
