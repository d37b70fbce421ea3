"""Torch reference attention (CPU and GPU): paged gather + SDPA.

The oracle every kernel test compares against. Decode-only batches gather all
requests at once (padded, masked); mixed batches loop over requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_blocks, block_size, kh, d = k_cache.shape
    k_cache.view(num_blocks * block_size, kh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, kh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a request's paged context: ``[length, KH, D]``."""
    bs = cache.shape[1]
    n = (length + bs - 1) // bs
    return cache[block_ids[:n].long()].flatten(0, 1)[:length]


def paged_attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    T, H, D = q.shape
    KH = k_cache.shape[2]
    group = H // KH
    out = torch.empty_like(q)
    if meta.is_decode_only:
        B = meta.num_requests
        max_len = meta.max_seq_len
        bs = k_cache.shape[1]
        nb = (max_len + bs - 1) // bs
        tables = meta.block_tables[:, :nb].long()
        k = k_cache[tables].flatten(1, 2)[:, :max_len]          # [B, L, KH, D]
        v = v_cache[tables].flatten(1, 2)[:, :max_len]
        k = k.transpose(1, 2).repeat_interleave(group, dim=1)   # [B, H, L, D]
        v = v.transpose(1, 2).repeat_interleave(group, dim=1)
        pos = torch.arange(max_len, device=q.device)
        mask = pos[None, :] < meta.seq_lens[:, None].to(q.device)  # [B, L]
        o = F.scaled_dot_product_attention(q.view(B, H, 1, D), k.to(q.dtype), v.to(q.dtype),
                                           attn_mask=mask[:, None, None, :], scale=scale)
        return o.view(B, H, D)
    start = 0
    for b, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qb = q[start:start + ql].transpose(0, 1)                  # [H, ql, D]
        kb = gather_context(k_cache, meta.block_tables[b], sl).transpose(0, 1)
        vb = gather_context(v_cache, meta.block_tables[b], sl).transpose(0, 1)
        kb = kb.repeat_interleave(group, dim=0).to(q.dtype)
        vb = vb.repeat_interleave(group, dim=0).to(q.dtype)
        # query i sits at position sl - ql + i and sees keys 0..that position
        qpos = torch.arange(sl - ql, sl, device=q.device)
        mask = torch.arange(sl, device=q.device)[None, :] <= qpos[:, None]
        out[start:start + ql] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale).transpose(0, 1)
        start += ql
    return out


class TorchAttention:
    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)
