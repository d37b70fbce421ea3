"""Staged exports (kvtransfer/staging.py): a holder's pull takes the export made
when the request became held, only when it is exactly what the pull asks for."""

import torch

from kvtransfer import KVHandle
from kvtransfer.pair_host import export_part
from kvtransfer.sources import CacheKVSource
from kvtransfer.staging import StagedExports
from tests.kvtransfer.nccl_holder_proc import HELD_BLOCKS, make_full_cache


class StagingSource(CacheKVSource):
    def __init__(self, cache, budget):
        super().__init__(cache)
        self.staged = StagedExports(budget)
        self.exports = 0

    def take_staged(self, handle, start_block):
        return self.staged.take(handle, start_block)

    def export_sync(self, handle, start_block):
        self.exports += 1
        return super().export_sync(handle, start_block)


def handle(blocks=HELD_BLOCKS):
    src = make_full_cache(torch.float32)
    return KVHandle("r1", "holder", "127.0.0.1:1", list(blocks), 4 * len(blocks), 7,
                    CacheKVSource(src).layout, transport="nccl", transport_address="x")


def test_a_pull_takes_the_staged_export_once_and_falls_back_otherwise():
    cache = make_full_cache(torch.float32)
    source = StagingSource(cache, budget=1 << 20)
    source.hold("r1", HELD_BLOCKS)
    staged = cache.export_blocks(HELD_BLOCKS)
    assert source.staged.put("r1", HELD_BLOCKS, staged)
    waits = []

    def export(h, start):        # as a pair thread does: staged (wait for its event) or exported now
        return export_part(source.take_staged, source.export_sync, h, start,
                           lambda ready: waits.append(("event", ready)), lambda: waits.append("engine"))
    assert export(handle(), 1) is not staged and source.exports == 1       # from block 1: not what was staged
    assert waits == ["engine"]                                             # an export now waits for the engine
    assert export(handle(), 0) is staged and source.exports == 1           # taken, no export
    assert waits[1] == ("event", None)                                     # staged: its own event (none on CPU)
    assert len(source.staged) == 0 and source.staged.num_bytes == 0 and source.staged.hits == 1
    again = export(handle(), 0)                                            # taken once: exported now
    assert source.exports == 2 and torch.equal(again, staged) and waits[2] == "engine"


def test_stale_blocks_budget_and_retain():
    cache = make_full_cache(torch.float32)
    data = cache.export_blocks(HELD_BLOCKS)
    size = data.numel() * data.element_size()
    staged = StagedExports(budget_bytes=size + size // 2)
    assert staged.put("a", HELD_BLOCKS, data)
    assert not staged.put("b", HELD_BLOCKS, data.clone())                   # over budget
    assert staged.take(handle(list(reversed(HELD_BLOCKS))), 0) is None     # other blocks: not served
    staged.retain({"x": None})                                             # "a" is no longer held
    assert len(staged) == 0 and staged.num_bytes == 0
    assert staged.put("b", HELD_BLOCKS, data)
