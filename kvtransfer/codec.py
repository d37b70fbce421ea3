"""Export tensor ↔ raw byte chunks with xxh64 checksums.

The wire format is the tensor's C-order bytes in its native element encoding;
bfloat16 travels as its 2-byte pattern (the tensor is viewed as uint8, so no
numpy bf16 support is needed). ``ChunkAssembler`` verifies each chunk (order,
offset, bounds, checksum) before copying it into one preallocated buffer and
yields a tensor only when every byte arrived.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import xxhash

from kvtransfer.base import KVTransferError
from kvtransfer.layout import KVLayout

DEFAULT_CHUNK_BYTES = 1 << 20      # 1 MiB: well under gRPC's 4 MiB default message limit
MAX_CHUNK_BYTES = 3 << 20


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh64_intdigest(data)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a CPU contiguous tensor (copies to CPU / contiguous first if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(t.numpy())


def split(buf: memoryview, chunk_bytes: int) -> Iterator[tuple[int, int, bytes, int]]:
    """Yield ``(index, offset, data, checksum)`` covering ``buf``."""
    for index, offset in enumerate(range(0, len(buf), chunk_bytes)):
        data = bytes(buf[offset:offset + chunk_bytes])
        yield index, offset, data, checksum(data)


def num_chunks(total_bytes: int, chunk_bytes: int) -> int:
    return math.ceil(total_bytes / chunk_bytes)


class ChunkAssembler:
    """Receiver side: verify and place chunks; ``tensor()`` once complete."""

    def __init__(self, layout: KVLayout, shape: tuple[int, ...], total_bytes: int, expected_chunks: int):
        expected = math.prod(shape) * layout.element_size
        if total_bytes != expected:
            raise KVTransferError(f"header says {total_bytes} bytes but shape {shape} of {layout.dtype} "
                                  f"needs {expected}")
        self.layout, self.shape, self.total_bytes = layout, shape, total_bytes
        self.expected_chunks = expected_chunks
        self._buf = torch.empty(total_bytes, dtype=torch.uint8)
        self._view = memoryview(self._buf.numpy())
        self.received = 0
        self.next_index = 0

    def add(self, index: int, offset: int, data: bytes, digest: int) -> None:
        if index != self.next_index:
            raise KVTransferError(f"chunk {index} arrived out of order (expected {self.next_index})")
        if offset != self.received or offset + len(data) > self.total_bytes:
            raise KVTransferError(f"chunk {index} has offset {offset} and {len(data)} bytes; expected "
                                  f"offset {self.received} within {self.total_bytes} bytes")
        got = checksum(data)
        if got != digest:
            raise KVTransferError(f"checksum mismatch in chunk {index} (offset {offset}, {len(data)} bytes): "
                                  f"expected xxh64 {digest:016x}, got {got:016x}")
        self._view[offset:offset + len(data)] = data
        self.received += len(data)
        self.next_index += 1

    def tensor(self) -> torch.Tensor:
        if self.received != self.total_bytes or self.next_index != self.expected_chunks:
            raise KVTransferError(f"stream ended early: {self.received}/{self.total_bytes} bytes in "
                                  f"{self.next_index}/{self.expected_chunks} chunks")
        return self._buf.view(torch_dtype(self.layout.dtype)).reshape(self.shape)
