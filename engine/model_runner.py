"""SchedulerOutput → tensors → model → sampler.

Lifecycle of one step: ``execute(sched)`` runs the scheduler's block copies
(copy-on-write), flattens the scheduled requests' tokens into one batch,
builds the AttentionMetadata, runs the model under ``forward_context``,
takes the last hidden state of every request that samples this step, computes
its logits (``run``: what every tensor-parallel rank replays) and samples. Decode-only batches may be replayed from a captured
CUDA graph (``engine.cuda_graphs``) when one is installed.
"""

from __future__ import annotations

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
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        bs = self.block_size
        width = max(len(s.block_ids) for s in sched.requests)
        tables = []
        for s in sched.requests:
            n = len(s.token_ids)
            input_ids += s.token_ids
            pos = range(s.start_pos, s.start_pos + n)
            positions += pos
            slots += [s.block_ids[p // bs] * bs + p % bs for p in pos]
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.start_pos + n)
            tables.append(s.block_ids + [0] * (width - len(s.block_ids)))
        query_lens = [len(s.token_ids) for s in sched.requests]

        def t(x, dtype):
            x = torch.tensor(x, dtype=dtype, pin_memory=self._pin)
            return x.to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=t(slots, torch.int64), query_start_loc=t(qsl, torch.int32),
            seq_lens=t(seq_lens, torch.int32), block_tables=t(tables, torch.int32),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return t(input_ids, torch.int64), t(positions, torch.int64), meta

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
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """``[L, 2, n, bs, KH, D]`` copy of the blocks (a TP runner returns head shards)."""
        return self.kv_cache.export_blocks(block_ids)

    def import_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache.import_blocks(block_ids, data)
