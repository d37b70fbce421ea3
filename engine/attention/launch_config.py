"""Launch configuration of the paged-attention kernels (``triton_ops``): device
queries and the tile / warp / split tables, which depend on shapes and the
device only (pure Python, no kernels).
"""

from __future__ import annotations

import functools

import torch


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device (132 for the CPU interpreter: an H100's)."""
    if device.type != "cuda":
        return 132
    return _num_sms(_device_index(device))


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int) -> int:
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def max_shared_mem(device: torch.device) -> int:
    """Shared memory one program may use (0 under the CPU interpreter)."""
    if device.type != "cuda":
        return 0
    return _max_shared_mem(_device_index(device))


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      block_n: int, sms: int, max_splits: int = 64) -> int:
    """Splits per (request, KV head): enough programs for ~2 waves, from shapes only.

    Capped by the tiles of the longest context the block table can describe,
    so the value is the same for every step of a CUDA-graph bucket.
    """
    want = -(-2 * sms // max(1, batch * num_kv_heads))
    most = max(1, -(-max_blocks * block_size // block_n))
    return max(1, min(want, most, max_splits))


def decode_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Tile size and launch shape of the decode kernel.

    From the H100 sweep in benchmarks/results/attention_h100_sweep.json: 64-key
    tiles, 4 warps, 3 stages are best or within 2% of best from B=8 up; at B=1
    every config is within 0.5 us of the others.
    """
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)


def prefill_config(dtype: torch.dtype, head_dim: int, smem: int = 0) -> dict:
    """Tile sizes and launch shape of the prefill kernel.

    128x128 tiles, 8 warps, 3 stages (165 KB of shared memory at head dim 128)
    were 13-21% faster than 128x64 on H100 for 1k-8k contexts
    (benchmarks/results/attention_h100_sweep.json); GPUs with less shared
    memory per program get 128x64.
    """
    if dtype == torch.float32:   # IEEE fp32 dots run on the FMA units: small tiles, no tensor cores
        if head_dim <= 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128 if smem >= 180_000 else 64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def prefill_num_tiles(query_lens: list[int], block_m: int) -> int:
    """Programs per query head: query tiles of the requests with query_len > 1."""
    return sum(-(-n // block_m) for n in query_lens if n > 1)
