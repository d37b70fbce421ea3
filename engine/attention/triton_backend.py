"""TritonAttention: the GPU backend (same interface as ``TorchAttention``).

Dispatch of ``attend``:
- decode-only batch (``max_query_len == 1``): one ``paged_decode`` launch
  whose grid and arguments depend on shapes only — CUDA-graph capturable. Rows
  are requests (``T == B``); padded requests carry ``seq_len == 0`` (output
  zeros) and ``slot_mapping == -1`` (the store skips them).
- anything else: ``paged_prefill`` for requests with query_len > 1 and, when the
  batch also holds query_len-1 requests, ``paged_decode`` in mixed mode for
  those rows. Both write disjoint rows of one output.

The number of decode splits comes from the batch size, the KV heads, the SM
count and the block-table width, so a captured graph keeps a valid grid for
any context length its block table can describe.
"""

from __future__ import annotations

import torch

from engine.attention import triton_ops
from engine.attention.metadata import AttentionMetadata


class TritonAttention:
    name = "triton"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        triton_ops.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_decode_only:
            return triton_ops.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if 1 in meta.query_lens_cpu:
            triton_ops.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                    out=out, query_start_loc=meta.query_start_loc)
        triton_ops.paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                 meta.query_start_loc, meta.query_lens_cpu, scale, out=out)
        return out

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)
