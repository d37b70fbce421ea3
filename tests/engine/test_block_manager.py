"""Block manager stories: exact block ids, ref counts, eviction order."""

from engine.block_manager import BlockManager
from engine.hashing import hash_blocks
from engine.request import Request, SamplingParams


def make_req(rid, tokens, bs=4):
    r = Request(rid, tokens, SamplingParams(max_tokens=4))
    r.block_hashes = hash_blocks(tokens, bs)
    return r


def compute_all(bm, req):
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)


def test_allocate_hands_out_blocks_in_order_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(10)))           # 10 tokens → 3 blocks
    assert bm.allocate(a, 10)
    assert a.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.ref_counts[:3] == [1, 1, 1]
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8
    assert bm.ref_counts == [0] * 8


def test_allocation_fails_without_change_when_the_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_req("a", list(range(12)))
    assert not bm.allocate(a, 12)
    assert a.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_hit_reuses_full_blocks_and_shares_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(10)))
    bm.allocate(a, 10)
    compute_all(bm, a)                              # blocks 0,1 full → hashed
    assert [e.kind for e in bm.drain_events()] == ["stored"]
    b = make_req("b", list(range(8)) + [99, 98, 97])   # shares the two full blocks
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate(b, 11, hits)
    assert b.block_ids == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]


def test_a_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(8)))
    bm.allocate(a, 8)
    compute_all(bm, a)
    b = make_req("b", list(range(8)))
    assert bm.get_computed_blocks(b) == [0]         # the last token must be computed for logits


def test_freed_cached_blocks_survive_until_evicted_lru_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(8)))
    bm.allocate(a, 8); compute_all(bm, a); bm.free(a)          # blocks 0,1 cached free
    c = make_req("c", list(range(100, 108)))
    bm.allocate(c, 8); compute_all(bm, c); bm.free(c)          # blocks 2,3 cached free
    bm.drain_events()
    # a's blocks were freed first but tail-first: LRU order is 1, 0, 3, 2
    d = make_req("d", list(range(200, 204)))
    assert bm.allocate(d, 4)
    assert d.block_ids == [1]                       # evicts a's tail block
    assert [(e.kind, e.block_hashes) for e in bm.drain_events()] == [("removed", [a.block_hashes[1]])]
    # a's first block is still a hit
    assert bm.get_computed_blocks(make_req("a2", list(range(8)) + [5])) == [0]


def test_plain_free_blocks_are_used_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(4)) + [7])
    bm.allocate(a, 5); compute_all(bm, a); bm.free(a)   # block 0 cached, block 1 plain
    b = make_req("b", [9] * 3)
    bm.allocate(b, 3)
    assert b.block_ids == [2]                       # plain FIFO: 2, 3, then 1, then cached 0
    c = make_req("c", [8] * 12)
    bm.allocate(c, 12)
    assert c.block_ids == [3, 1, 0]


def test_fork_shares_blocks_and_copy_on_write_of_the_partial_tail():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_req("p", list(range(6)))
    bm.allocate(parent, 6); compute_all(bm, parent)           # [0, 1]; block 1 partial
    child = make_req("p#1", list(range(6)))
    bm.fork(parent, child)
    assert child.block_ids == [0, 1] and bm.ref_counts[:2] == [2, 2]
    assert bm.num_cow_blocks(child, 5) == 1
    copies = bm.prepare_write(child, 5)               # child rewrites position 5 (block 1)
    assert copies == [(1, 2)]
    assert child.block_ids == [0, 2] and bm.ref_counts[:3] == [2, 1, 1]
    assert bm.prepare_write(parent, 6) == []          # the parent owns block 1 alone now
    bm.free(child); bm.free(parent)
    assert bm.num_free_blocks == 8


def test_reset_prefix_cache_drops_cached_hashes():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(8)))
    bm.allocate(a, 8); compute_all(bm, a); bm.free(a)
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_req("b", list(range(9)))) == []
    assert bm.drain_events()[-1].kind == "cleared"
