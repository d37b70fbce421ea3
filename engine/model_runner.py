"""SchedulerOutput → tensors → model → sampler.

Lifecycle of one step: ``execute(sched)`` runs the scheduler's block copies
(copy-on-write), flattens the scheduled requests' tokens into one batch,
builds the AttentionMetadata, runs the model under ``forward_context``,
takes the last hidden state of every request that samples this step, computes
its logits (``run``: what every tensor-parallel rank replays) and samples. Decode-only batches may be replayed from a captured
CUDA graph (``engine.cuda_graphs``) when one is installed.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata, forward_context
from engine.kv_cache import KVCache
from engine.outputs import RunnerOutput, SchedulerOutput
from engine.request import Request
from engine.sampler import Sampler


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, backend, device: torch.device, max_model_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_req = -(-max_model_len // self.block_size)
        self.sampler = Sampler()
        self.graphs = None          # engine.cuda_graphs.CUDAGraphRunner, set by the engine on GPU
        self._pin = device.type == "cuda"

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Host-side batch building in numpy (a nested-list ``torch.tensor`` of the
        block tables alone cost ~1.6 ms per step at B=128 on an H100 host), packed
        into two staging arrays — int64 (token ids, positions, slots) and int32
        (seq lens, query starts, block tables) — so a step makes two pinned,
        non-blocking host→device copies; the tensors are views of them."""
        bs = self.block_size
        reqs = sched.requests
        B = len(reqs)
        query_lens = [len(s.token_ids) for s in reqs]
        starts = [s.start_pos for s in reqs]
        seq_lens = [st + n for st, n in zip(starts, query_lens)]
        T = sum(query_lens)
        width = max(len(s.block_ids) for s in reqs)
        i64 = np.empty(3 * T, dtype=np.int64)
        i32 = np.zeros(2 * B + 1 + B * width, dtype=np.int32)
        ids, positions, slots = i64[:T], i64[T:2 * T], i64[2 * T:]
        sl, qsl, tables = i32[:B], i32[B:2 * B + 1], i32[2 * B + 1:].reshape(B, width)
        for i, s in enumerate(reqs):
            tables[i, :len(s.block_ids)] = s.block_ids
        ids[:] = np.fromiter((t for s in reqs for t in s.token_ids), dtype=np.int64, count=T)
        if max(query_lens) == 1:                       # decode-only: one position per request
            positions[:] = starts
            rows = np.arange(B)
        else:
            positions[:] = np.concatenate([np.arange(st, st + n) for st, n in zip(starts, query_lens)])
            rows = np.repeat(np.arange(B), query_lens)
        slots[:] = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
        sl[:] = seq_lens
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1:])

        def to_device(x: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(x)
            if self._pin:
                x = x.pin_memory()
            return x.to(self.device, non_blocking=True)

        d64, d32 = to_device(i64), to_device(i32)
        meta = AttentionMetadata(
            slot_mapping=d64[2 * T:], query_start_loc=d32[B:2 * B + 1], seq_lens=d32[:B],
            block_tables=d32[2 * B + 1:].view(B, width), max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return d64[:T], d64[T:2 * T], meta

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        if self.graphs is not None and meta.is_decode_only and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        with forward_context(meta, self.kv_cache, self.backend):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        rows, reqs = [], []
        end = 0
        for s in sched.requests:
            end += len(s.token_ids)
            if s.sample and s.request_id in requests:
                rows.append(end - 1)
                reqs.append(requests[s.request_id])
        logits = self.run(sched, rows)
        if logits is None:
            return RunnerOutput()
        sampled = self.sampler(logits, reqs)
        return RunnerOutput(sampled={r.request_id: tok for r, tok in zip(reqs, sampled)})

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, rows: list[int]) -> torch.Tensor | None:
        """Block copies, the forward, and the logits of the flattened-batch ``rows``
        (None when there is nothing to sample). Everything but sampling: the part
        every tensor-parallel rank replays (engine/tp_executor.py)."""
        for src, dst in sched.copy_blocks:
            self.kv_cache.copy_block(src, dst)
        if not sched.requests:
            return None
        input_ids, positions, meta = self.prepare(sched)
        hidden = self.forward(input_ids, positions, meta)
        if not rows:
            return None
        if len(rows) == hidden.shape[0]:              # every row samples (decode): no gather
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """``[L, 2, n, bs, KH, D]`` copy of the blocks (a TP runner returns head shards)."""
        return self.kv_cache.export_blocks(block_ids)

    def import_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache.import_blocks(block_ids, data)
