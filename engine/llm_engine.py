"""LLMEngine: the only wiring class — tokenizer, scheduler, block manager, runner.

Lifecycle of a request through the engine:
  ``add_request`` (validate, tokenize, one Request per sample; samples 1..n-1 of
  an ``n > 1`` request wait as ``pending_children`` of sample 0) → ``step()``:
  schedule → execute → update (tokens appended, stop tokens/length checked by
  the scheduler, stop strings by the output processor here) → RequestOutput per
  request with news → finished: blocks freed, or held (prefill mode) until
  ``release``. ``abort`` finishes a request from any state.

Decisions:
- ``n > 1``: sample 0 runs the prompt; when its prompt is done, samples 1..n-1
  fork its block table (ref counts) and recompute only the last prompt token
  (writing it copy-on-write into the shared tail block) to draw their own first
  token. Seeds: sample i uses ``seed + i``.
- Stop strings are excluded from the text (OpenAI semantics); streamed text is
  held back while it could still be the start of a stop string.
- The usable context is ``min(max_model_len, num_kv_blocks * block_size)``,
  so a request can always finish even alone in the pool.
- Async scheduling (``EngineConfig.async_scheduling``, default on CUDA): one
  step stays in flight. ``step()`` schedules step N+1 — a request whose step-N
  sample is not known yet gets a PLACEHOLDER token the runner fills from step
  N's sampled ids on the device — launches it, and only then waits for step N's
  ids, updates and returns step N's outputs; the host work of one step hides
  behind the device work of the next. A request that step N finishes (EOS, stop
  string) has computed one wasted token in N+1, which ``update`` ignores;
  finishes by length are foreseen and not scheduled.
- On CUDA, start-up runs a mixed and a decode-only step of made-up requests
  (``ModelRunner.warm_up``): every Triton kernel variant compiles then, never
  in a served step, where a compile stalled the engine thread 0.2-2 s.
- On CUDA the engine ends its start-up with ``gc.collect(); gc.freeze()``: the
  objects alive then (model, torch, tokenizer) are never scanned again by the
  cyclic GC, whose full collections otherwise stall a step by ~100 ms
  (benchmarks/decode_steady.py shows it).
- ``tensor_parallel_size > 1``: this engine is rank 0 of a TP group; the
  scheduler, block manager, sampler and tokenizer live here only, and every
  step's runner inputs are replayed by the other ranks
  (engine/tp_executor.py). ``close()`` stops them.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping
from types import MappingProxyType

import torch

from engine.attention import get_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.kv_cache import KVCache, KVCacheSpec
from engine.model_runner import ModelRunner
from engine.outputs import (BlockEvent, CompletionOutput, EngineStats, HeldRequest, KVPlan,
                            RequestOutput)
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler


class LLMEngine:
    def __init__(self, config: EngineConfig, tp_launcher=None):
        """``tp_launcher``: how ranks 1..tp-1 are started when
        ``config.tensor_parallel_size > 1`` (default: local processes; see
        engine/tp_executor.py). This engine is rank 0 of its TP group."""
        from engine.models.loader import load_model

        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.tp_executor = None
        tp = None
        if config.tensor_parallel_size > 1:
            from engine.tp_executor import TPExecutor
            self.tp_executor = TPExecutor.launch(config, tp_launcher)
            tp = self.tp_executor.tp
            self.device = tp.device
        if self.device.type == "cuda":
            if self.device.index is None:            # "cuda": the current device, named (transports need it)
                self.device = torch.device("cuda", torch.cuda.current_device())
            # kernels (Triton's above all) and events use the thread's current device: the
            # constructing thread (a worker's engine thread) steps on this engine's GPU
            torch.cuda.set_device(self.device)
        try:
            self._build(config, load_model, tp)
        except BaseException:
            self.close()
            raise
        self._groups: dict[str, list[Request]] = {}      # request_id → its samples
        self._detok: dict[str, object] = {}              # per sample: IncrementalDetokenizer
        self._sent: dict[str, tuple[int, int]] = {}      # per sample: (tokens, chars) already streamed
        self._inflight = None                            # async scheduling: the step on the device
        self._async = config.use_async_scheduling
        if self.device.type == "cuda":
            # the model, torch and the tokenizer are millions of long-lived objects: a full
            # collection over them stalls a decode step by ~100 ms (H100 host, B=128)
            gc.collect()
            gc.freeze()

    def _build(self, config: EngineConfig, load_model, tp) -> None:
        loaded = load_model(config.model, self.dtype, self.device, seed=config.seed,
                            hf_overrides=config.hf_overrides, tp=tp)
        self.model = loaded.model
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        if config.tokenizer:
            from engine.tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_path(config.tokenizer)
        self.eos_token_ids = tuple(mc.eos_token_ids) or (
            tuple(self.tokenizer.eos_token_ids) if self.tokenizer else ())
        # this rank's cache: its KV heads only (all of them at TP=1)
        self.kv_spec = KVCacheSpec.for_model(mc, config.tensor_parallel_size, config.block_size, self.dtype)
        self.backend = get_backend(config.attention_backend, self.device)
        num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        self.kv_cache = KVCache(self.kv_spec, num_blocks, self.device)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, hold_after_prefill=config.mode == "prefill")
        if self.tp_executor is None:
            self.runner = ModelRunner(self.model, self.kv_cache, self.backend, self.device, self.max_model_len)
        else:
            self.runner = self.tp_executor.make_runner(self.model, self.kv_cache, self.backend,
                                                       self.max_model_len)
        # CUDA graphs capture single-process steps only: TP>1 runs eagerly (for now)
        if self.device.type == "cuda" and not config.enforce_eager and self.tp_executor is None:
            self._install_cuda_graphs()
        if self.device.type == "cuda":      # every Triton kernel compiles now, not in a served step
            self.runner.warm_up()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do at TP=1). Idempotent."""
        if self.tp_executor is not None:
            self.tp_executor.close()
            self.tp_executor = None

    # ---- intake -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._groups or request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n > 1 and self.config.mode == "prefill":
            raise ValueError("n > 1 is not supported by a prefill-only engine; send n requests")
        prompt_ids = self._tokenize(prompt)
        samples = [self._new_request(request_id, prompt_ids, params, i, arrival_time) for i in range(params.n)]
        samples[0].pending_children = samples[1:]
        self._groups[request_id] = samples
        self.scheduler.add(samples[0])

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                             f"tokens, so the prompt must be at most {self.max_model_len - 1}")
        return ids

    def _new_request(self, gid, prompt_ids, params, index, arrival_time) -> Request:
        """Sample ``index`` of group ``gid`` (sample 0 carries the group's id)."""
        rid = f"{gid}#{index}" if index else gid
        req = Request(rid, prompt_ids, params, self.eos_token_ids, arrival_time,
                      parent_id=gid if index else None, sample_index=index)
        if params.seed is not None:
            req.generator = torch.Generator(self.device).manual_seed(params.seed + index)
        if self.tokenizer is not None:
            from engine.tokenizer import IncrementalDetokenizer
            self._detok[rid] = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        self._sent[rid] = (0, 0)
        return req

    # ---- the loop -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step. With async scheduling the step scheduled now is
        launched and the outputs returned are those of the step launched by the
        previous call (its host work overlaps this step's device work)."""
        sched = self.scheduler.schedule()
        if not self._async:
            result = self.runner.execute(sched, self.scheduler.requests)
            return self._process(self.scheduler.update(sched, result))
        prev, self._inflight = self._inflight, None
        if not sched.is_empty:
            self._inflight = self.runner.launch(sched, self.scheduler.requests, prev)
        if prev is None:
            return []
        return self._process(self.scheduler.update(prev.sched, self.runner.collect(prev)))

    def has_unfinished(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished()

    def has_schedulable(self) -> bool:
        """True when ``step()`` has work now (requests whose KV is in flight excluded)."""
        return self._inflight is not None or self.scheduler.has_schedulable()

    @property
    def num_running(self) -> int:
        """Requests in the running batch (each advances every step)."""
        return len(self.scheduler.running)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        base = f"gen-{time.monotonic_ns()}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids) and self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def abort(self, request_id: str) -> bool:
        samples = self._groups.pop(request_id, None)
        if samples is None:
            return self.release(request_id)
        for req in samples:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._forget(req.request_id)
        return True

    # ---- outputs ----------------------------------------------------------------------
    def _process(self, changed: list[Request]) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        for req in changed:
            if req.pending_children and req.num_output_tokens == 1:
                self._fork(req)
            self._detokenize(req)
            touched[req.parent_id or req.request_id] = None
        return [o for gid in touched if (o := self._group_output(gid)) is not None]

    def _fork(self, parent: Request) -> None:
        # the parent's prompt is computed and its first token appended: the children
        # share its blocks and recompute the last prompt token (CoW on the tail block)
        now = time.monotonic()
        for child in parent.pending_children:
            if parent.block_ids:
                self.block_manager.fork(parent, child)
                child.block_hashes = list(parent.block_hashes[:len(child.prompt_token_ids) // self.config.block_size])
                child.num_computed_tokens = child.num_prompt_tokens - 1
            child.first_scheduled_time = now
            child.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.requests[child.request_id] = child
            self.scheduler.waiting.append(child)
        parent.pending_children = []

    def _detokenize(self, req: Request) -> None:
        det = self._detok.get(req.request_id)
        if det is None:
            return
        new = req.output_token_ids[req.num_detokenized:]
        req.num_detokenized = req.num_output_tokens
        if new and new[-1] in req.eos_token_ids and not req.params.ignore_eos:
            new = new[:-1]
        det.step(new)
        if req.params.stop and req.text_cut is None:
            text = det.text
            window = text[max(0, self._sent[req.request_id][1] - req.stop_holdback - 1):]
            for s in req.params.stop:
                at = window.find(s)
                if at >= 0:
                    cut = len(text) - len(window) + at
                    req.stop_reason = s
                    req.text_cut = cut
                    if req.is_finished:        # finished by length on the same token
                        req.status = RequestStatus.FINISHED_STOPPED
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                    break

    def _text(self, req: Request) -> str:
        det = self._detok.get(req.request_id)
        if det is None:
            return ""
        return det.text if req.text_cut is None else det.text[:req.text_cut]

    def _group_output(self, gid: str) -> RequestOutput | None:
        samples = self._groups.get(gid)
        if samples is None:
            return None
        finished = all(r.is_finished for r in samples) and not samples[0].pending_children
        held = samples[0].status == RequestStatus.HELD
        outs = []
        for r in samples:
            text = self._text(r)
            outs.append(CompletionOutput(
                index=r.sample_index, token_ids=list(r.output_token_ids), text=text,
                finish_reason=r.status.finish_reason, stop_reason=r.stop_reason,
                logprobs=list(r.output_logprobs) if r.params.logprobs is not None else None))
        first = samples[0]
        n_tok, n_chr = self._sent[first.request_id]
        text0 = outs[0].text
        visible = len(text0) if first.is_finished or held else max(n_chr, len(text0) - first.stop_holdback)
        out = RequestOutput(
            request_id=gid, prompt_token_ids=first.prompt_token_ids, outputs=outs,
            finished=finished or held, num_cached_tokens=first.num_cached_tokens,
            new_token_ids=first.output_token_ids[n_tok:], new_text=text0[n_chr:visible],
            metrics={"arrival_time": first.arrival_time, "first_scheduled_time": first.first_scheduled_time,
                     "first_token_time": first.first_token_time, "held": held})
        self._sent[first.request_id] = (first.num_output_tokens, visible)
        if finished:
            self._groups.pop(gid, None)
            for r in samples:
                self._forget(r.request_id)
        return out

    def _forget(self, rid: str) -> None:
        self._detok.pop(rid, None)
        self._sent.pop(rid, None)

    # ---- prefill mode ----------------------------------------------------------------
    @property
    def held_requests(self) -> Mapping[str, HeldRequest]:
        """The held requests by id: a read-only live view, not a copy."""
        return MappingProxyType(self.scheduler.held)

    def get_held(self, request_id: str) -> HeldRequest:
        try:
            return self.scheduler.held[request_id]
        except KeyError:
            raise KeyError(f"no held request {request_id!r}") from None

    def export_kv(self, request_id: str, start_block: int = 0) -> torch.Tensor:
        """``[L, 2, n, bs, KH, D]`` of the held blocks; at TP=k, the head shards of
        every rank stacked in rank order: ``[k, L, 2, n, bs, KH/k, D]``."""
        held = self.get_held(request_id)
        return self.runner.export_kv(held.block_ids[start_block:])

    def release(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None or request_id not in self.scheduler.held:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        self._groups.pop(request_id, None)
        self._forget(request_id)
        return True

    def expire_held(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [rid for rid, h in self.scheduler.held.items() if now - h.held_since > self.config.hold_ttl_s]
        for rid in expired:
            self.release(rid)
        return expired

    # ---- decode side of disaggregation ---------------------------------------------
    def add_request_with_kv(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                            params: SamplingParams | None = None) -> KVPlan:
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("a request with remote KV has exactly one sample (n=1)")
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._tokenize(list(prompt_token_ids))
        if not 0 <= first_token < self.model_config.vocab_size:
            raise ValueError("first_token out of the vocabulary")
        req = self._new_request(request_id, ids, params, 0, None)
        req.first_token = first_token
        try:
            num_blocks, num_tokens = self.scheduler.add_with_kv(req)
        except MemoryError:
            self._forget(request_id)
            raise
        self._groups[request_id] = [req]
        return KVPlan(request_id, list(req.block_ids[:-(-len(ids) // self.config.block_size)]),
                      num_blocks, num_tokens)

    def import_kv(self, request_id: str, data: torch.Tensor) -> None:
        req = self.scheduler.waiting_for_kv.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not waiting for KV")
        num_prompt_blocks = -(-req.num_prompt_tokens // self.config.block_size)
        missing = req.block_ids[req.num_cached_tokens // self.config.block_size:num_prompt_blocks]
        self.runner.import_kv(missing, data)

    def finish_kv(self, request_id: str, ok: bool, first_logprob: float | None = None) -> list[RequestOutput]:
        req = self.scheduler.waiting_for_kv.get(request_id)
        if req is None:
            return []
        if not ok:
            self.abort(request_id)
            return []
        self.scheduler.finish_kv(req, req.first_token, first_logprob)
        return self._process([req])

    # ---- observability ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting) + len(s.waiting_for_kv),
            num_held=len(s.held), num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions)

    def drain_block_events(self) -> list[BlockEvent]:
        return self.block_manager.drain_events()

    # ---- memory ------------------------------------------------------------------------
    def _auto_num_blocks(self) -> int:
        per_block = self.kv_spec.bytes_per_block
        if self.device.type != "cuda":
            return max(16, int(self.config.cpu_kv_cache_gib * 2**30) // per_block)
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len or 1 << 30,
                self.model_config.max_position_embeddings)
        if self.tp_executor is not None:
            self.tp_executor.profile(n)     # every rank profiles the same forward
        num = gpu_kv_blocks(self.model, self.kv_spec, self.backend, self.device, n,
                            self.config.gpu_memory_utilization)
        if self.tp_executor is not None:
            num = self.tp_executor.tp.min_int(num)
        if num < 1:
            raise ValueError("not enough GPU memory for the KV cache; raise gpu_memory_utilization")
        return num

    def _install_cuda_graphs(self) -> None:
        try:
            from engine.cuda_graphs import CUDAGraphRunner
        except ImportError:
            return
        self.runner.graphs = CUDAGraphRunner(self.runner, self.config.max_num_seqs)


def profile_forward(model, kv_spec: KVCacheSpec, backend, device: torch.device, num_tokens: int) -> None:
    """One forward of ``num_tokens`` tokens on a scratch cache (peak activation memory)."""
    from engine.outputs import ScheduledRequest, SchedulerOutput
    blocks = math.ceil(num_tokens / kv_spec.block_size)
    scratch = KVCache(kv_spec, blocks, device)
    runner = ModelRunner(model, scratch, backend, device, num_tokens)
    sched = SchedulerOutput([ScheduledRequest("profile", [0] * num_tokens, 0, list(range(blocks)), True)])
    runner.run(sched, [num_tokens - 1])
    del scratch, runner
    torch.cuda.synchronize(device)


def gpu_kv_blocks(model, kv_spec: KVCacheSpec, backend, device: torch.device, num_tokens: int,
                  utilization: float) -> int:
    """KV blocks that fit in ``utilization`` of the GPU after the weights and the
    peak of a ``num_tokens`` forward (may be < 1)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_forward(model, kv_spec, backend, device, num_tokens)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = total * utilization - peak - used_by_others
    return int(budget // kv_spec.bytes_per_block)
