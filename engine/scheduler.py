"""Continuous batching: every step, give each request tokens so that its
``num_computed_tokens`` catches up with its tokens, under the step's token
budget and ``max_num_seqs``. Chunked prefill and prefix hits fall out of that.

Lifecycle of a request in the scheduler:
  add → ``waiting`` (FIFO) → scheduled: prefix hits taken, blocks allocated →
  ``running`` → each step: tokens computed, maybe one sampled (``update``) →
  finished: blocks freed (or, in prefill mode, ``held`` until ``release``).
  When blocks run out, the newest running request is preempted: its blocks are
  freed, ``num_computed_tokens`` reset, and it goes back to the head of
  ``waiting`` (recompute). Decode-side requests whose KV comes from elsewhere
  wait in ``waiting_for_kv`` with their blocks until ``finish_kv``.
"""

from __future__ import annotations

import time
from collections import deque

from engine.block_manager import BlockManager
from engine.hashing import hash_blocks
from engine.outputs import PLACEHOLDER, HeldRequest, RunnerOutput, ScheduledRequest, SchedulerOutput
from engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, hold_after_prefill: bool = False):
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.hold_after_prefill = hold_after_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, HeldRequest] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- intake ---------------------------------------------------------------
    def add(self, req: Request) -> None:
        self._update_hashes(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_kv)

    def has_schedulable(self) -> bool:
        """Work a ``schedule()`` call can make progress on now (not KV still in flight)."""
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_expected_tokens - req.num_scheduled_tokens, budget)
            if n <= 0 or self._will_finish_by_length(req):
                i += 1          # nothing to compute, or its in-flight sample ends it
                continue
            while not self._reserve(req, n):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                out.copy_blocks += self.block_manager.prepare_write(req, req.num_scheduled_tokens)
                self._emit(out, req, n)
                budget -= n
                i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            cached = []
            if not req.block_ids:
                cached = self.block_manager.get_computed_blocks(req)
            num_cached = len(cached) * self.block_size
            n = min(req.num_tokens - req.num_computed_tokens - num_cached, budget)
            if not self._reserve(req, req.num_computed_tokens + num_cached + n, cached, absolute=True):
                break
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_cached
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += num_cached
            req.num_computed_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.copy_blocks += self.block_manager.prepare_write(req, req.num_computed_tokens)
            self._emit(out, req, n)
            budget -= n
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _reserve(self, req: Request, n: int, cached: list[int] = (), absolute: bool = False) -> bool:
        """Blocks for ``req`` to hold its scheduled tokens + ``n`` more (or ``n`` in
        total when ``absolute``), plus one for a copy-on-write if needed."""
        total = n if absolute else req.num_scheduled_tokens + n
        bm = self.block_manager
        need = bm.blocks_needed(req, total, cached) + bm.num_cow_blocks(req, req.num_scheduled_tokens)
        if not bm.can_allocate(need, cached):
            return False
        return bm.allocate(req, total, cached)

    def _will_finish_by_length(self, req: Request) -> bool:
        """An in-flight sample will end ``req`` by max_tokens / context length (async)."""
        return req.num_inflight_samples > 0 and (
            req.num_output_tokens + req.num_inflight_samples >= req.params.max_tokens
            or req.num_expected_tokens >= self.max_model_len)

    def _emit(self, out: SchedulerOutput, req: Request, n: int) -> None:
        start = req.num_scheduled_tokens
        ids = req.token_ids[start:start + n]
        ids += [PLACEHOLDER] * (n - len(ids))     # the in-flight sample (async scheduling)
        sample = start + n == req.num_expected_tokens
        out.requests.append(ScheduledRequest(
            request_id=req.request_id, token_ids=ids, start_pos=start,
            block_ids=list(req.block_ids), sample=sample))
        req.num_inflight_tokens += n
        req.num_inflight_samples += sample

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_inflight_tokens = req.num_inflight_samples = 0   # its in-flight step is ignored
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        out.preempted_ids.append(req.request_id)

    # ---- after the forward ----------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled ones, finish what stopped.
        Returns the requests that got a new token (finished ones included)."""
        changed = []
        for s in sched.requests:
            req = self.requests.get(s.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue          # finished, aborted or preempted since it was scheduled
            req.num_computed_tokens += len(s.token_ids)
            req.num_inflight_tokens -= len(s.token_ids)
            req.num_inflight_samples -= s.sample
            self.block_manager.cache_full_blocks(req)
            tok = result.sampled.get(s.request_id)
            if tok is None:
                continue
            self.append_token(req, tok.token_id, tok.top_logprobs, tok.logprob)
            changed.append(req)
        return changed

    def append_token(self, req: Request, token_id: int, top_logprobs=None, logprob=None) -> None:
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_ids.append(token_id)
        if req.params.logprobs is not None:
            entry = dict(top_logprobs or {})
            if logprob is not None:
                entry.setdefault(token_id, logprob)
            req.output_logprobs.append(entry)
        self._update_hashes(req)
        reason = self._check_stop(req, token_id)
        if reason is not None:
            self.finish(req, reason)
        elif self.hold_after_prefill and req.num_output_tokens == 1:
            self._hold(req, logprob)

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        p = req.params
        if not p.ignore_eos and token_id in req.eos_token_ids:
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token_id in p.stop_token_ids:
            req.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Finish ``req`` (any state) and free its blocks."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        self.waiting_for_kv.pop(req.request_id, None)
        self.held.pop(req.request_id, None)
        req.status = status
        self.block_manager.free(req)
        self.requests.pop(req.request_id, None)

    def _hold(self, req: Request, logprob: float | None) -> None:
        """Prefill mode: keep the prompt's blocks for the decode side."""
        self.running.remove(req)
        req.status = RequestStatus.HELD
        req.held_since = time.monotonic()
        num_prompt_blocks = -(-req.num_prompt_tokens // self.block_size)
        self.held[req.request_id] = HeldRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            first_token=req.token_ids[-1], block_ids=req.block_ids[:num_prompt_blocks],
            held_since=req.held_since, first_logprob=logprob)

    # ---- decode side of disaggregation ----------------------------------------
    def add_with_kv(self, req: Request) -> tuple[int, int]:
        """Allocate blocks for a prompt whose KV comes from elsewhere, reusing local
        prefix hits. Returns (num_cached_blocks, num_cached_tokens); raises
        MemoryError when the pool cannot hold it now."""
        self._update_hashes(req)
        bm = self.block_manager
        cached = bm.get_computed_blocks(req, leave_one=False)
        # +1 token: room for the first sampled token's KV written next step
        if not self._reserve(req, req.num_prompt_tokens + 1, cached, absolute=True):
            raise MemoryError("KV cache full")
        req.status = RequestStatus.WAITING_FOR_KV
        req.num_cached_tokens = len(cached) * self.block_size
        self.prefix_cache_queries += req.num_prompt_tokens
        self.prefix_cache_hits += req.num_cached_tokens
        self.requests[req.request_id] = req
        self.waiting_for_kv[req.request_id] = req
        return len(cached), req.num_cached_tokens

    def finish_kv(self, req: Request, first_token: int, logprob: float | None = None) -> None:
        """The prompt's KV is in place: the prompt counts as computed, the first
        token (sampled by the prefill side) is appended, decoding continues here."""
        del self.waiting_for_kv[req.request_id]
        req.num_computed_tokens = req.num_prompt_tokens
        req.first_scheduled_time = time.monotonic()
        self.block_manager.cache_full_blocks(req)
        req.status = RequestStatus.WAITING
        self.append_token(req, first_token, None, logprob)
        if not req.is_finished:
            self.waiting.append(req)

    def _update_hashes(self, req: Request) -> None:
        if self.block_manager.enable_prefix_caching and req.num_tokens // self.block_size > len(req.block_hashes):
            req.block_hashes = hash_blocks(req.token_ids, self.block_size, existing=req.block_hashes)
