"""The attention backend interface: store new K/V into the paged cache, then attend.

Cache tensors per layer: ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write k/v ``[T, KH, D]`` to the cache slots ``slot_mapping [T]``."""

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q ``[T, H, D]`` → out ``[T, H, D]``; causal over each request's paged context."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        ...


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` → triton on CUDA (if Triton imports), else the torch reference."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        from engine.attention.torch_ref import TorchAttention
        return TorchAttention()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend needs a CUDA device")
        from engine.attention.triton_backend import TritonAttention
        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        from engine.attention import triton_backend  # noqa: F401
        return True
    except Exception:
        return False
