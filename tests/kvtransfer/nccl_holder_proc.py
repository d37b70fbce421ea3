"""A second process holding KV for the nccl-transport tests (gloo on CPU).

``holder_main(commands, replies)`` obeys tuples from ``commands``:
``("start", name, dtype, tp_size[, device])`` builds a seeded cache (``make_full_cache``;
at tp_size 2 the source exports both head shards, stacked, as a TP=2 prefill
worker does), holds request "r1" = blocks [5, 2, 11, 7] and serves it through a
``PairHost`` → replies its store address; ``("num_pairs", name)`` → int;
``("close", name)`` → True; ``("exit",)`` ends the process.
"""

import contextlib
import multiprocessing as mp

import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kvtransfer.layout import KVLayout
from kvtransfer.sources import CacheKVSource

HELD_BLOCKS = [5, 2, 11, 7]


def make_full_cache(dtype: torch.dtype, device: str = "cpu", num_kv_heads: int = 2) -> KVCache:
    """The same bits on every device: drawn on the CPU from a fixed seed, then copied."""
    spec = KVCacheSpec(num_layers=2, num_kv_heads=num_kv_heads, head_dim=16, block_size=4, dtype=dtype)
    cache = KVCache(spec, 16, torch.device(device))
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(7)))
    return cache


class ShardedSource:
    """Two rank caches holding the head halves of one full cache (a TP=2 holder)."""

    def __init__(self, full: KVCache):
        half = full.spec.num_kv_heads // 2
        spec = KVCacheSpec(full.spec.num_layers, half, full.spec.head_dim, full.spec.block_size, full.spec.dtype)
        self.shards = []
        for r in range(2):
            c = KVCache(spec, full.num_blocks, full.device)
            c.tensor.copy_(full.tensor[..., r * half:(r + 1) * half, :])
            self.shards.append(CacheKVSource(c, r, 2))
        self.layout = KVLayout.from_spec(spec, 0, 2)

    def hold(self, rid, block_ids):
        for s in self.shards:
            s.hold(rid, block_ids)

    def export_sync(self, handle, start_block):
        return torch.stack([s.export_sync(handle, start_block) for s in self.shards])


def holder_main(commands, replies) -> None:
    from kvtransfer.nccl_pairs import PairHost

    hosts = {}
    while True:
        cmd = commands.get()
        if cmd[0] == "exit":
            for h in hosts.values():
                h.close()
            return
        if cmd[0] == "start":
            _, name, dtype, tp_size, *rest = cmd
            device = torch.device(rest[0] if rest else "cpu")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            full = make_full_cache(dtype, device)
            source = ShardedSource(full) if tp_size == 2 else CacheKVSource(full)
            source.hold("r1", HELD_BLOCKS)
            hosts[name] = PairHost(source.export_sync, device)
            replies.put(hosts[name].store_address)
        elif cmd[0] == "num_pairs":
            replies.put(hosts[cmd[1]].num_pairs)
        elif cmd[0] == "close":
            hosts.pop(cmd[1]).close()
            replies.put(True)


@contextlib.contextmanager
def spawned_holder(reply_timeout_s: float):
    """A holder process (``holder_main``) and ``call(*cmd)`` to drive it; the process
    is asked to exit, then terminated if it lingers."""
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=holder_main, args=(commands, replies), daemon=True)
    proc.start()

    def call(*cmd):
        commands.put(cmd)
        return replies.get(timeout=reply_timeout_s)
    try:
        yield call
    finally:
        commands.put(("exit",))
        proc.join(reply_timeout_s / 6)
        if proc.is_alive():
            proc.terminate()
