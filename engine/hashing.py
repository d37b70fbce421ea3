"""Chained block hashes — pure Python; the router imports this module too.

A full block's hash is ``hash(parent_hash, token_ids)``: equal hashes mean equal
whole prefixes. Hashes are 64-bit ints from blake2b (stable across processes and
Python versions, unlike ``hash()``), so the router and every worker agree.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH,
                start_block: int = 0, existing: Sequence[int] = ()) -> list[int]:
    """Hashes of every *full* block of ``token_ids``. ``existing`` (already computed
    hashes of the first blocks) is reused and extended."""
    hashes = list(existing)
    parent = hashes[-1] if hashes else parent_hash
    for i in range(len(hashes) + start_block, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes
