"""AttentionMetadata and the per-forward context.

The model's layers read the metadata and the KV cache of the current forward
through ``get_forward_context()``; ``forward_context(...)`` sets it for exactly
one forward and always clears it (no bare global leaks between steps).

Token layout of a forward: the tokens of all scheduled requests are flattened
into one ``[T]`` batch, request b owning rows ``query_start_loc[b]:query_start_loc[b+1]``.
Request b's new tokens sit at the end of its context: after the KV store its
context in the paged cache is ``seq_lens[b]`` tokens, and query row i of the
request (0-based within the request) has position ``seq_lens[b] - query_len_b + i``
and attends causally to cache positions ``0..that position``.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64: cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor   # [B+1] int32: cumulative query lengths
    seq_lens: torch.Tensor          # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor      # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]       # host copies, for backends that loop on the host
    seq_lens_cpu: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_cache: "object"   # engine.kv_cache.KVCache (layer(i) -> (k_cache, v_cache))
    backend: "object"    # an AttentionBackend


_local = threading.local()   # one forward at a time per thread (engines in threads don't collide)


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata, kv_cache, backend) -> Iterator[ForwardContext]:
    if getattr(_local, "ctx", None) is not None:
        raise RuntimeError("nested forward_context: one forward at a time per thread")
    _local.ctx = ForwardContext(metadata, kv_cache, backend)
    try:
        yield _local.ctx
    finally:
        _local.ctx = None


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("attention called outside forward_context()")
    return ctx
