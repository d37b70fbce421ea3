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
    return cache.index_select(0, block_ids[:n].long()).flatten(0, 1)[:length]


def paged_attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """GQA without repeating K/V: query head ``h`` reads KV head ``h // group``
    (HF's ``repeat_kv`` order), so q is viewed as ``[KH, group * rows, D]`` and
    every KV head attends for its whole group of query heads at once."""
    T, H, D = q.shape
    KH = k_cache.shape[2]
    group = H // KH
    if meta.is_decode_only:
        B = meta.num_requests
        max_len = meta.max_seq_len
        bs = k_cache.shape[1]
        nb = (max_len + bs - 1) // bs
        tables = meta.block_tables[:, :nb].long()
        flat = tables.flatten()
        k = k_cache.index_select(0, flat).view(B, nb * bs, KH, D)[:, :max_len].transpose(1, 2)  # [B, KH, L, D]
        v = v_cache.index_select(0, flat).view(B, nb * bs, KH, D)[:, :max_len].transpose(1, 2)
        pos = torch.arange(max_len, device=q.device)
        mask = pos[None, :] < meta.seq_lens[:, None].to(q.device)      # [B, L]
        o = F.scaled_dot_product_attention(q.view(B, KH, group, D), k.to(q.dtype), v.to(q.dtype),
                                           attn_mask=mask[:, None, None, :], scale=scale)
        return o.reshape(B, H, D)
    out = torch.empty_like(q)
    start = 0
    for b, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        # [ql, H, D] → [KH, group * ql, D]: rows of one KV head's query heads, head-major
        qb = q[start:start + ql].view(ql, KH, group, D).permute(1, 2, 0, 3).reshape(KH, group * ql, D)
        kb = gather_context(k_cache, meta.block_tables[b], sl).transpose(0, 1).to(q.dtype)   # [KH, sl, D]
        vb = gather_context(v_cache, meta.block_tables[b], sl).transpose(0, 1).to(q.dtype)
        # query i sits at position sl - ql + i and sees keys 0..that position
        qpos = torch.arange(sl - ql, sl, device=q.device)
        mask = torch.arange(sl, device=q.device)[None, :] <= qpos[:, None]              # [ql, sl]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.repeat(group, 1), scale=scale)
        out[start:start + ql] = ob.view(KH, group, ql, D).permute(2, 0, 1, 3).reshape(ql, H, D)
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
