"""CUDA graphs for decode steps: one graph per batch-size bucket.

A decode step of a 32-layer model is ~1,000 small kernel launches; replaying
them from a graph removes the host launch cost, which otherwise dominates at
small batches. ``ModelRunner.forward`` calls ``can_run(meta)`` and, when true,
``run(input_ids, positions, meta)`` instead of the eager model.

Lifecycle of a bucket: first ``run`` of a batch that pads to it (or
``capture_all()`` at start-up) → one eager warm-up forward (compiles Triton
kernels, creates cuBLAS handles) → capture into the shared memory pool → every
later step copies its inputs into the static buffers and replays.

Decisions:
- Buckets: 1, 2, 4, 8, then multiples of 8 to 64, of 16 to 256, of 32 beyond,
  capped by ``max_num_seqs`` (always a bucket). A batch pads to the next one.
- Static buffers (``input_ids``, ``positions``, ``slot_mapping``, ``seq_lens``,
  ``block_tables`` [max_num_seqs, max_blocks_per_req]) are allocated once; each
  graph captures views of their first ``bucket`` rows. Padding rows get
  ``slot_mapping = -1`` (the KV store skips them) and ``seq_len = 0`` (decode
  attention writes zeros); stale block-table entries beyond a request's
  ``ceil(seq_len / block_size)`` blocks are never read.
- Only the Triton backend is captured: its decode launch depends on shapes
  only. The torch reference slices by host values (``max_seq_len``), so with it
  ``can_run`` is False and every step runs eagerly.
- Capture happens with every row padded (nothing is written to the KV cache).
- Graphs share one memory pool and are never replayed concurrently. The tensor
  ``run`` returns is a view of the graph's output: valid until the next ``run``.
- ``capture_seconds[bucket]`` records warm-up + capture time per bucket.
"""

from __future__ import annotations

import time

import torch

from engine.attention.metadata import AttentionMetadata, forward_context


def default_buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 256 else 32)
    return sizes + [max_num_seqs]


class CUDAGraphRunner:
    def __init__(self, runner, max_num_seqs: int, buckets: list[int] | None = None):
        self.runner = runner
        self.buckets = sorted(set(buckets or default_buckets(max_num_seqs)))
        self.enabled = runner.device.type == "cuda" and getattr(runner.backend, "name", "") == "triton"
        n, dev = self.buckets[-1], runner.device
        self.max_blocks = runner.max_blocks_per_req
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds: dict[int, float] = {}
        self._pool = None

    def bucket_for(self, num_requests: int) -> int | None:
        for b in self.buckets:
            if b >= num_requests:
                return b
        return None

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (self.enabled and meta.is_decode_only and meta.num_requests <= self.buckets[-1]
                and meta.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_requests
        bucket = self.bucket_for(n)
        if bucket not in self.graphs:
            self.capture(bucket)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        if bucket > n:
            self.slot_mapping[n:bucket].fill_(-1)
            self.seq_lens[n:bucket].zero_()
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every bucket now (largest first); returns the total seconds."""
        for b in reversed(self.buckets):
            if b not in self.graphs:
                self.capture(b)
        return sum(self.capture_seconds.values())

    @torch.inference_mode()
    def capture(self, bucket: int) -> None:
        t0 = time.perf_counter()
        self.slot_mapping[:bucket].fill_(-1)    # capture (and warm-up) with every row padded
        self.seq_lens[:bucket].zero_()
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
            seq_lens=self.seq_lens[:bucket], block_tables=self.block_tables[:bucket],
            max_query_len=1, max_seq_len=self.max_blocks * self.runner.block_size,
            query_lens_cpu=[1] * bucket, seq_lens_cpu=[0] * bucket)
        ids, pos = self.input_ids[:bucket], self.positions[:bucket]
        model, kv, backend = self.runner.model, self.runner.kv_cache, self.runner.backend
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), forward_context(meta, kv, backend):
            model(ids, pos)                      # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a second engine starting in this process,
        # a KV pair thread) must not invalidate this capture; only this thread's must not sync
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), \
                forward_context(meta, kv, backend):
            out = model(ids, pos)
        torch.cuda.synchronize(self.runner.device)
        self._pool = graph.pool()
        self.graphs[bucket] = graph
        self.outputs[bucket] = out
        self.capture_seconds[bucket] = time.perf_counter() - t0
