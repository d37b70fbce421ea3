"""Block pool: free queue, hash → block, ref counts, LRU of cached free blocks.

Lifecycle of a block:
  free (no hash) ──allocate──▶ in use (ref ≥ 1) ──full & computed──▶ cached in use
  (hash registered) ──last ref freed──▶ cached free (hash kept, tail of the LRU
  queue) ──prefix hit──▶ in use again, or ──evicted (popped from the LRU head
  for a new allocation)──▶ its hash is dropped and the block is reused.

Invariants:
- ``ref_count == 0`` ⟺ the block is free: in ``_free_plain`` (no hash; a FIFO,
  used first) or in ``_free_cached`` (hash kept; an insertion-ordered dict used as
  the LRU queue: its head is evicted first, only when no plain block is left).
- A block id appears in ``_hash_to_block`` only while its content is a computed
  full block whose chained hash is the key.
- A partial block shared by several requests (``n > 1`` forks) is copied on the
  first write (``prepare_write``), so no request ever writes a block another reads.
Events (stored / removed / cleared) accumulate until ``drain_events``.
"""

from __future__ import annotations

from collections import deque

from engine.outputs import BlockEvent
from engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: dict[int, None] = {}
        self._hash_to_block: dict[int, int] = {}
        self._events: list[BlockEvent] = []

    # ---- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int, cached: list[int] = ()) -> int:
        """New blocks ``req`` needs so that ``num_tokens`` tokens fit in its table
        once the ``cached`` prefix hits are appended to it."""
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids) - len(cached))

    def get_computed_blocks(self, req: Request, leave_one: bool = True) -> list[int]:
        """Leading cached blocks of ``req``'s hashes (stops at the first miss). With
        ``leave_one`` at least one token is left to compute, so the last logits
        exist; the decode side of a disaggregated request needs no logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        max_blocks = (req.num_tokens - (1 if leave_one else 0)) // self.block_size
        for h in req.block_hashes[:max_blocks]:
            b = self._hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    # ---- allocation -----------------------------------------------------------
    def can_allocate(self, num_blocks: int, cached: list[int] = ()) -> bool:
        # cached free blocks we take for ourselves leave the free pool too
        reused_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        return num_blocks + reused_free <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens: int, cached: list[int] = ()) -> bool:
        """Grow ``req``'s table (first taking ``cached`` prefix hits) to hold
        ``num_tokens`` tokens. False (and no change) if the pool is too small."""
        need = self.blocks_needed(req, num_tokens, cached)
        if not self.can_allocate(need, cached):
            return False
        for b in cached:
            self._touch(b)
        req.block_ids.extend(cached)
        req.block_ids.extend(self._pop_free() for _ in range(need))
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """``child`` shares every block of ``parent`` (ref counts +1)."""
        for b in parent.block_ids:
            self.ref_counts[b] += 1
        child.block_ids = list(parent.block_ids)

    def prepare_write(self, req: Request, start_pos: int) -> list[tuple[int, int]]:
        """Copy-on-write: before ``req`` writes from ``start_pos`` on, replace a shared
        block at that position by a private copy. Returns (src, dst) copies to run.
        Callers ensure one free block is available (``num_cow_blocks``)."""
        idx = start_pos // self.block_size
        if idx >= len(req.block_ids):
            return []
        b = req.block_ids[idx]
        if self.ref_counts[b] <= 1:
            return []
        new = self._pop_free()
        self.ref_counts[b] -= 1
        req.block_ids[idx] = new
        return [(b, new)]

    def num_cow_blocks(self, req: Request, start_pos: int) -> int:
        idx = start_pos // self.block_size
        return int(idx < len(req.block_ids) and self.ref_counts[req.block_ids[idx]] > 1)

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of ``req``'s computed full blocks (new ones only)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        stored: list[int] = []
        for i in range(num_full):
            b, h = req.block_ids[i], req.block_hashes[i]
            if self.block_hash[b] is not None:
                continue
            if h in self._hash_to_block:   # same content already cached elsewhere: keep the first
                continue
            self.block_hash[b] = h
            self._hash_to_block[h] = b
            stored.append(h)
        if stored:
            self._events.append(BlockEvent("stored", stored))

    def free(self, req: Request) -> None:
        """Drop ``req``'s references, tail first, so a sequence's last blocks are
        evicted before its (more shareable) first ones."""
        for b in reversed(req.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    self._free_plain.append(b)
                else:
                    self._free_cached[b] = None
        req.block_ids = []

    def reset_prefix_cache(self) -> None:
        for b in list(self._free_cached):
            self._drop_hash(b, emit=False)
            self._free_plain.append(b)
        self._free_cached.clear()
        self._events.append(BlockEvent("cleared"))

    def drain_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    # ---- internals ------------------------------------------------------------
    def _touch(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            del self._free_cached[b]   # a hit is always a cached block
        self.ref_counts[b] += 1

    def _pop_free(self) -> int:
        if self._free_plain:
            b = self._free_plain.popleft()
        else:
            b = next(iter(self._free_cached))   # LRU head
            del self._free_cached[b]
            self._drop_hash(b)
        self.ref_counts[b] = 1
        return b

    def _drop_hash(self, b: int, emit: bool = True) -> None:
        h = self.block_hash[b]
        if h is None:
            return
        self.block_hash[b] = None
        if self._hash_to_block.get(h) == b:
            del self._hash_to_block[h]
            if emit:
                self._events.append(BlockEvent("removed", [h]))
