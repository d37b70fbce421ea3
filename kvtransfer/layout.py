"""KVLayout: the shape and type of one engine's KV cache, and when two match.

Torch-free (the router imports it). Blocks can move between two caches only if
their layouts are compatible: same dtype, block size, layer count, head dim and
KV-head sharding — or the one re-layout defined: a holder of tensor-parallel
size k > 1 (each rank ``num_kv_heads`` heads) into a TP=1 cache holding all
``k * num_kv_heads`` heads.

Wire shape: a holder sends its whole TP group's blocks at once. At TP=1 that
is the export ``[L, 2, n, bs, KH, D]``; at TP=k it is every rank's head shard
stacked in rank order, ``[k, L, 2, n, bs, KH/k, D]`` (what a TP engine's
``export_kv`` returns). ``kvtransfer.relayout.to_local`` turns the latter into
the receiver's full-head export shape.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


class KVLayoutError(ValueError):
    """Two KV layouts cannot exchange blocks (or a layout is malformed)."""


@dataclass(frozen=True)
class KVLayout:
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int   # heads held by this rank
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KVLayoutError(f"KV dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if int(getattr(self, name)) < 1:
                raise KVLayoutError(f"KV layout {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise KVLayoutError(f"tp_rank {self.tp_rank} outside [0, tp_size={self.tp_size})")

    @classmethod
    def from_spec(cls, spec, tp_rank: int = 0, tp_size: int = 1) -> "KVLayout":
        """From an ``engine.kv_cache.KVCacheSpec`` (its dtype is a torch dtype)."""
        dtype = str(spec.dtype).removeprefix("torch.")
        return cls(dtype, spec.block_size, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                   tp_rank, tp_size)

    @property
    def element_size(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def export_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of ``KVCache.export_blocks`` for ``num_blocks`` blocks."""
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def wire_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of what a holder of this layout sends for ``num_blocks`` blocks."""
        shape = self.export_shape(num_blocks)
        return (self.tp_size, *shape) if self.tp_size > 1 else shape

    def merges_shards_of(self, other: "KVLayout") -> bool:
        """True when ``other`` is a TP>1 holder whose head shards, side by side,
        make up this TP=1 layout's heads (the one defined re-layout)."""
        return (self.tp_size == 1 and other.tp_size > 1
                and self.num_kv_heads == other.num_kv_heads * other.tp_size)

    def check_compatible(self, other: "KVLayout") -> None:
        """Raise ``KVLayoutError`` naming every mismatch unless blocks of the remote
        holder ``other`` can be imported into a cache of this layout (as is, or
        through the TP=k → TP=1 head-shard merge)."""
        diffs = [f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
                 for name in ("dtype", "block_size", "num_layers", "head_dim")
                 if getattr(self, name) != getattr(other, name)]
        if self.merges_shards_of(other):
            pass
        elif self.tp_size != other.tp_size:
            diffs.append(f"tp_size {self.tp_size} != {other.tp_size} with {self.num_kv_heads} vs "
                         f"{other.num_kv_heads} KV heads per rank (tensor-parallel re-layout is defined "
                         f"only from TP=k into TP=1 holding all k*{other.num_kv_heads} heads)")
        else:
            if self.num_kv_heads != other.num_kv_heads:
                diffs.append(f"num_kv_heads {self.num_kv_heads!r} != {other.num_kv_heads!r}")
            if self.tp_rank != other.tp_rank and self.tp_size == 1:
                diffs.append(f"tp_rank {self.tp_rank} != {other.tp_rank} (different head shards)")
        if diffs:
            raise KVLayoutError("incompatible KV layouts (local vs remote): " + "; ".join(diffs))
