"""SchedulerOutput → tensors → model → sampler.

Lifecycle of one step: ``launch(sched, requests, prev)`` runs the scheduler's
block copies (copy-on-write), flattens the scheduled requests' tokens into one
batch (PLACEHOLDER tokens are filled on the device from ``prev``'s sampled
ids), builds the AttentionMetadata, runs the model under ``forward_context``,
takes the last hidden state of every request that samples this step, computes
its logits (``run``: what every tensor-parallel rank replays), samples on the
device and queues the copy of the sampled ids to pinned host memory → returns
an ``InflightStep`` at once → ``collect(step)`` waits for that copy only and
returns the RunnerOutput. ``execute`` = both, back to back. Decode-only
batches may be replayed from a captured CUDA graph (``engine.cuda_graphs``)
when one is installed.

``warm_up()`` (the engine calls it at the end of start-up on GPU) runs one mixed
step and one decode-only step of made-up requests, so that every Triton kernel
variant serving uses is compiled before the first request: the kernels'
variants depend on the model and the device only, not on the step's batch
size (engine/attention/triton_ops.py), so two steps cover every later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata, forward_context
from engine.kv_cache import KVCache
from engine.outputs import PLACEHOLDER, RunnerOutput, ScheduledRequest, SchedulerOutput
from engine.request import Request
from engine.sampler import Sampler


@dataclass
class InflightStep:
    """A launched step: what was scheduled, who samples (row order), the sampled
    tensors on the device and their host copies (filled when the step samples)."""
    sched: SchedulerOutput
    reqs: list[Request]
    sampled: list[torch.Tensor] | None = None
    host: list[torch.Tensor] | None = None
    event: object = None            # torch.cuda.Event recorded after the host copies

    def row_of(self) -> dict[str, int]:
        return {r.request_id: i for i, r in enumerate(self.reqs)}


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
        self._prev: InflightStep | None = None     # set by ``launch`` while ``run`` prepares

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
        fill = self._placeholders(sched)
        P = len(fill) // 2
        i64 = np.empty(3 * T + 2 * P, dtype=np.int64)
        i32 = np.zeros(2 * B + 1 + B * width, dtype=np.int32)
        ids, positions, slots = i64[:T], i64[T:2 * T], i64[2 * T:3 * T]
        i64[3 * T:] = fill
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
        if P:       # placeholders ← the in-flight step's sampled ids, on the device
            d64[:T].index_copy_(0, d64[3 * T:3 * T + P], self._prev.sampled[0].index_select(0, d64[3 * T + P:]))
        meta = AttentionMetadata(
            slot_mapping=d64[2 * T:3 * T], query_start_loc=d32[B:2 * B + 1], seq_lens=d32[:B],
            block_tables=d32[2 * B + 1:].view(B, width), max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return d64[:T], d64[T:2 * T], meta

    def _placeholders(self, sched: SchedulerOutput) -> list[int]:
        """[flat positions of PLACEHOLDER tokens..., their rows in the previous
        step's sampled ids...]; a placeholder is always its request's last token."""
        dst, src = [], []
        end = 0
        rows = None
        for s in sched.requests:
            end += len(s.token_ids)
            if s.token_ids[-1] == PLACEHOLDER:
                if rows is None:
                    if self._prev is None or self._prev.sampled is None:
                        raise RuntimeError("a placeholder token without a step in flight")
                    rows = self._prev.row_of()
                dst.append(end - 1)
                src.append(rows[s.request_id])
        return dst + src

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        if self.graphs is not None and meta.is_decode_only and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        with forward_context(meta, self.kv_cache, self.backend):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        """One step, synchronously."""
        return self.collect(self.launch(sched, requests))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, requests: dict[str, Request],
               prev: InflightStep | None = None) -> InflightStep:
        """Queue a step's device work (forward, logits, sampling, the copy of the
        sampled ids to pinned host memory) without waiting for it. ``prev``: the
        step still in flight, whose sampled ids fill this step's PLACEHOLDER tokens."""
        rows, reqs = [], []
        end = 0
        for s in sched.requests:
            end += len(s.token_ids)
            if s.sample and s.request_id in requests:
                rows.append(end - 1)
                reqs.append(requests[s.request_id])
        step = InflightStep(sched, reqs)
        self._prev = prev
        try:
            logits = self.run(sched, rows)
        finally:
            self._prev = None
        if logits is None:
            return step
        step.sampled = self.sampler.sample(logits, reqs)
        step.host = [self._to_host(t) for t in step.sampled]
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record(torch.cuda.current_stream(self.device))
        return step

    def collect(self, step: InflightStep) -> RunnerOutput:
        """Wait for ``step``'s sampled ids (not for anything queued after it)."""
        if step.host is None:
            return RunnerOutput()
        if step.event is not None:
            step.event.synchronize()
        sampled = self.sampler.tokens(step.host, step.reqs)
        return RunnerOutput(sampled={r.request_id: tok for r, tok in zip(step.reqs, sampled)})

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
        return out.copy_(t, non_blocking=True)

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

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the kernels now: a mixed step (a prefill chunk beside a decode whose
        block table is wide enough to split its context) and a decode-only step,
        through ``run`` (tensor-parallel ranks replay them; a decode-only step may
        capture a CUDA graph). Call it before any request exists: its K/V land in
        blocks no request owns yet, which are written again before anyone reads them."""
        bs = self.block_size
        num_blocks = max(1, min(16, self.max_blocks_per_req, self.kv_cache.num_blocks))
        blocks = list(range(num_blocks))
        context = min(num_blocks * bs, self.max_model_len)
        chunk = min(2 * bs + 1, context)
        decode = ScheduledRequest("warm-up decode", [0], context - 1, blocks, True)
        steps = [SchedulerOutput([decode])]
        if chunk > 1:
            prefill = ScheduledRequest("warm-up prefill", [0] * chunk, 0, blocks[:-(-chunk // bs)], True)
            steps.insert(0, SchedulerOutput([prefill, decode]))
        for sched in steps:
            self.run(sched, [sum(len(r.token_ids) for r in sched.requests) - 1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """``[L, 2, n, bs, KH, D]`` copy of the blocks (a TP runner returns head shards)."""
        return self.kv_cache.export_blocks(block_ids)

    def import_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.kv_cache.import_blocks(block_ids, data)
