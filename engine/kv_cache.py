"""The KV tensors of one engine, and export/import of block ranges.

One tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(2 = key, value). ``layer(i)`` gives the ``(k_cache, v_cache)`` views the
attention backend writes. ``export_blocks`` copies a request's blocks into one
contiguous ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` tensor —
the unit the KV transports move — and ``import_blocks`` writes such a tensor
into (other) block ids of (another) engine's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, model_config, tp_size: int, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        """One rank's cache of ``model_config`` (an ``engine.models.llama.ModelConfig``):
        its KV heads only at ``tp_size > 1``."""
        from engine.distributed import local_kv_heads
        return cls(model_config.num_hidden_layers, local_kv_heads(model_config.num_key_value_heads, tp_size),
                   model_config.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        self.tensor = torch.zeros(spec.num_layers, 2, num_blocks, spec.block_size,
                                  spec.num_kv_heads, spec.head_dim, dtype=spec.dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[i, 0], self.tensor[i, 1]

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise ValueError(f"block ids out of range [0, {self.num_blocks})")
        index = torch.from_numpy(ids)
        if self.device.type != "cuda":
            return index
        # pinned + non-blocking: a pageable copy would block this thread until the
        # stream (the engine's, or a KV pair's after the engine's) drains
        return index.pin_memory().to(self.device, non_blocking=True)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[L*2, n, words]``: each block of a layer's K or V as one row of the widest
        integer words that tile it. Gathers then move 8-byte words rather than 2-byte
        elements (a generic index kernel is bound by elements, not bytes): same bits."""
        rows = t.reshape(t.shape[0] * 2, t.shape[2], -1)
        nbytes = rows.shape[2] * rows.element_size()
        for word in (torch.int64, torch.int32, torch.int16):
            size = torch.empty((), dtype=word).element_size()
            if nbytes % size == 0 and size >= rows.element_size():
                return rows.view(word)
        return rows

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Contiguous copy ``[L, 2, n, bs, KH, D]`` of the given blocks (on the cache's device)."""
        L, _, _, bs, kh, d = self.tensor.shape
        out = self._rows(self.tensor).index_select(1, self._index(block_ids))
        return out.view(self.spec.dtype).view(L, 2, len(block_ids), bs, kh, d)

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        expected = (self.spec.num_layers, 2, len(block_ids), self.spec.block_size,
                    self.spec.num_kv_heads, self.spec.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data shape {tuple(data.shape)} does not match cache layout {expected}")
        data = data.to(self.device, self.spec.dtype).contiguous()
        self._rows(self.tensor).index_copy_(1, self._index(block_ids), self._rows(data))

    def copy_block(self, src: int, dst: int) -> None:
        self.tensor[:, :, dst].copy_(self.tensor[:, :, src])
