"""Turn what a holder sent (its wire shape) into what the receiver's engine imports.

A TP=k holder sends every rank's head shard stacked in rank order,
``[k, L, 2, n, bs, KH/k, D]``; engines import full heads ``[L, 2, n, bs, KH, D]``
(a TP engine's ``import_kv`` keeps its own slice). Rank r's shard holds heads
``[r*KH/k, (r+1)*KH/k)``, so the merge is a move of the rank axis next to the
head axis and one reshape (one copy, on the tensor's device).
"""

from __future__ import annotations

import torch

from kvtransfer.layout import KVLayout, KVLayoutError


def to_local(data: torch.Tensor, remote: KVLayout, num_blocks: int) -> torch.Tensor:
    """``data`` of ``remote.wire_shape(num_blocks)`` → full heads ``[L, 2, n, bs, KH, D]``."""
    expected = remote.wire_shape(num_blocks)
    if tuple(data.shape) != expected:
        raise KVLayoutError(f"KV data of shape {tuple(data.shape)} does not match the holder's "
                            f"wire shape {expected}")
    if remote.tp_size == 1:
        return data
    k, L, two, n, bs, kh, d = data.shape
    return data.movedim(0, 4).reshape(L, two, n, bs, k * kh, d)
