"""One sample's life on the cluster, as a stream of token chunks.

Lifecycle of a sample (``Orchestrator.generate``):

    ROUTE     hash the prompt (``engine.hashing``, the workers' block size; once per
              prompt: ``n`` sibling samples share the hashes),
              ask the prefix index (one round trip), ask ``policy.route``
      ├─ remote ─▶ PREFILL  ``client.prefill`` on the chosen prefill worker;
      │                     on failure before it answers, the next-best prefill
      │                     worker (``prefill_attempts`` in all), then local
      │            FIRST    the handle's first token is yielded at once (TTFT)
      │            DECODE   ``client.decode(handle)`` stream on the decode worker
      └─ local ──▶ GENERATE ``client.generate`` stream on the decode worker
    RETRY     a DECODE/GENERATE stream that fails before it yielded a token
              (worker dead, KV pull failed, worker busy) is re-run on the
              next-best other decode worker (``decode_attempts`` in all) as a
              GENERATE: of the prompt, or, when the first token already came
              from the prefill worker, of prompt + first token for
              ``max_tokens - 1`` (re-prefilling there beats depending on a hold
              the failed worker may already have released). A stream that fails
              after yielding tokens is not retried: the sample ends with
              ``WorkerFailed`` saying how many tokens were streamed.
    FINISHED  a chunk with ``finish_reason``; or CLOSED early (client gone,
              stop string, error): whatever is still live is torn down in the
              background — an unanswered prefill is aborted, a held handle
              nobody pulls is released, a decode/generate stream is aborted.

The orchestrator yields token ids only; text (detokenization, stop strings) is
the caller's job (``router/detokenize.py``), because only the router sees the
whole output: the first token comes from the prefill worker, the rest from the
decode worker. Worker errors become ``WorkerFailed``; a worker refusing the
input (``ValueError`` / INVALID_ARGUMENT) becomes ``InvalidRequest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from engine.hashing import hash_blocks
from engine.request import SamplingParams
from router import policy
from router.directory import WorkerDirectory, WorkerView
from router.errors import InvalidRequest, NoWorkerAvailable, QueueFull, RequestError, WorkerFailed
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    """One sample (``params.n == 1``) of a validated, tokenized request.
    ``block_hashes`` (block size → the prompt's chained block hashes) is filled on
    first use; the ``n`` samples of one prompt share one dict, so the prompt is
    hashed once per request, not once per sample."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    block_hashes: dict[int, list[int]] = field(default_factory=dict)

    def hashes(self, block_size: int) -> list[int]:
        hashes = self.block_hashes.get(block_size)
        if hashes is None:
            hashes = self.block_hashes[block_size] = hash_blocks(self.prompt_token_ids, block_size)
        return hashes


@dataclass
class TokenChunk:
    """New output tokens of one sample. ``num_cached_tokens`` is the prompt part the
    prefilling worker took from its prefix cache (set on the first chunk)."""
    token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int | None = None
    logprobs: list | None = None


def _is_invalid_argument(error: BaseException) -> bool:
    if isinstance(error, ValueError):
        return True
    code = getattr(error, "code", None)
    try:
        return callable(code) and getattr(code(), "name", "") == "INVALID_ARGUMENT"
    except Exception:
        return False


def _worker_error(error: BaseException, worker_id: str, what: str) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if getattr(error, "code", None) == "RESOURCE_EXHAUSTED":
        return QueueFull(f"worker {worker_id} is busy; retry later")
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    if _is_invalid_argument(error):
        return InvalidRequest(f"worker {worker_id} refused the request: {text}")
    return WorkerFailed(f"{what} on worker {worker_id} failed: {text or type(error).__name__}")


class Orchestrator:
    def __init__(self, directory: WorkerDirectory, index: PrefixIndex, client_for: Callable[[str], Any],
                 metrics: RouterMetrics, policy_config: policy.PolicyConfig = policy.PolicyConfig(),
                 eos_token_ids: tuple[int, ...] = (), prefill_attempts: int = 3,
                 cleanup_timeout_s: float = 5.0, decode_attempts: int = 2):
        self.directory = directory
        self.index = index
        self.client_for = client_for
        self.metrics = metrics
        self.policy_config = policy_config
        self.eos_token_ids = tuple(eos_token_ids)
        self.prefill_attempts = prefill_attempts
        self.decode_attempts = decode_attempts
        self.cleanup_timeout_s = cleanup_timeout_s
        self.num_inflight: dict[str, int] = defaultdict(int)
        self.pending_prefill_tokens: dict[str, int] = defaultdict(int)
        self._cleanups: set[asyncio.Task] = set()

    # ---- routing ---------------------------------------------------------------
    async def route(self, req: SampleRequest, exclude_prefill: frozenset[str] = frozenset()
                    ) -> tuple[policy.RoutingDecision, dict[str, WorkerView]]:
        views = {v.worker_id: v for v in self.directory.views()}
        usable = [v for v in views.values() if v.healthy and not v.draining]
        if not any(v.role in ("decode", "colocated") for v in usable):
            raise NoWorkerAvailable("no healthy decode or colocated worker is available")
        cached = await self._match(req, usable)
        states = [self._state(v, cached.get(v.worker_id, 0)) for v in views.values()]
        decode_sizes = {v.block_size for v in usable if v.role in ("decode", "colocated")}
        routing = policy.RoutingRequest(len(req.prompt_token_ids), min(decode_sizes), req.params.max_tokens)
        try:
            decision = policy.route(routing, states, self.policy_config, exclude_prefill)
        except policy.NoCandidate as e:
            raise NoWorkerAvailable(str(e)) from None
        return decision, views

    def _state(self, v: WorkerView, cached_blocks: int = 0) -> policy.WorkerState:
        return policy.WorkerState(
            worker_id=v.worker_id, role=v.role, healthy=v.healthy, draining=v.draining,
            num_running=v.stats.num_running if v.stats else 0,
            num_waiting=v.stats.num_waiting if v.stats else 0,
            num_free_blocks=v.stats.num_free_blocks if v.stats else None,
            num_inflight=self.num_inflight[v.worker_id],
            pending_prefill_tokens=self.pending_prefill_tokens[v.worker_id],
            cached_blocks=cached_blocks)

    def _next_decode(self, req: SampleRequest, exclude: set[str]) -> WorkerView | None:
        """The least loaded healthy decode worker not in ``exclude`` (a retry), or None."""
        views = [v for v in self.directory.views() if v.worker_id not in exclude]
        routing = policy.RoutingRequest(len(req.prompt_token_ids) + 1, min((v.block_size for v in views),
                                                                          default=16), req.params.max_tokens)
        try:
            best, _ = policy.choose_decode_worker(routing, [self._state(v) for v in views], self.policy_config)
        except policy.NoCandidate:
            return None
        return next(v for v in views if v.worker_id == best.worker_id)

    async def _match(self, req: SampleRequest, views: list[WorkerView]) -> dict[str, int]:
        """Leading cached blocks per worker: one index round trip per distinct block size."""
        by_size: dict[int, list[str]] = defaultdict(list)
        for v in views:
            by_size[v.block_size].append(v.worker_id)
        cached: dict[str, int] = {}
        for block_size, ids in by_size.items():
            hashes = req.hashes(block_size)
            if hashes:
                cached.update(await self.index.match(hashes, ids))
        return cached

    # ---- a sample's life -----------------------------------------------------------
    async def generate(self, req: SampleRequest) -> AsyncIterator[TokenChunk]:
        start = time.monotonic()
        decision, views = await self.route(req)
        self.metrics.phase("routing", time.monotonic() - start)
        log.debug("request %s: %s", req.request_id, decision.reason)
        decode = views[decision.decode_worker_id]
        self.metrics.routed.labels(self.metrics.model, decode.worker_id, decode.role).inc()
        self.metrics.index_query_tokens.labels(self.metrics.model).inc(len(req.prompt_token_ids))
        self.metrics.index_hit_tokens.labels(self.metrics.model).inc(
            len(req.prompt_token_ids) - decision.uncached_tokens)
        self.num_inflight[decode.worker_id] += 1
        try:
            if decision.disaggregated:
                stream = self._remote(req, decision, views, decode)
            else:
                self._count_decision(decision.mode, decision.code)
                stream = self._local(req, decode)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
        finally:
            self.num_inflight[decode.worker_id] -= 1

    def _count_decision(self, mode: str, code: str) -> None:
        self.metrics.decisions.labels(self.metrics.model, mode, code).inc()

    async def _remote(self, req: SampleRequest, decision: policy.RoutingDecision,
                      views: dict[str, WorkerView], decode: WorkerView) -> AsyncIterator[TokenChunk]:
        answer, prefill = await self._prefill(req, decision, views)
        if answer is None:       # every prefill worker failed: prefill on the decode worker
            self._count_decision("local", "prefill_failed")
            async with contextlib.aclosing(self._local(req, decode)) as stream:
                async for chunk in stream:
                    yield chunk
            return
        self._count_decision("remote", decision.code)
        handle, result = answer
        prefill_client = self.client_for(prefill.address)
        first = int(handle.first_token)
        finish = getattr(result, "finish_reason", None) or self._finish_after_first(first, req.params)
        cached = getattr(result, "num_cached_tokens", None)
        # the first token's top logprobs (as a local Generate stream gives them); else its own logprob
        first_logprobs = getattr(result, "first_logprobs", None)
        if first_logprobs is None:
            first_logprobs = getattr(handle, "first_logprob", None)
        decoded = released = False

        def release() -> None:
            nonlocal released
            if handle.block_ids and not released:
                released = True
                self._background(prefill_client.release(handle.request_id), "release", prefill.worker_id)

        try:
            yield TokenChunk([first], finish, cached,
                             logprobs=None if first_logprobs is None else [first_logprobs])
            if finish is not None:
                return
            # a retry continues after the first token, on another worker, from scratch
            rest = replace(req.params, max_tokens=req.params.max_tokens - 1)
            retry = lambda c: c.generate(req.request_id, [*req.prompt_token_ids, first], rest)
            tried = [decode.worker_id]
            stream = self._relay(req, tried, decode, "decode", lambda c: c.decode(handle, req.params), retry,
                                 first_is_cached=False, on_retry=release)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    # only the Decode stream itself pulls (and so releases) the held blocks
                    decoded = chunk.finish_reason is not None and len(tried) == 1
                    yield chunk
        finally:
            # A decode that finished pulled the blocks and released them; otherwise free them
            # now (release is idempotent: a no-op if the decode worker got there first or
            # nothing was held because the request ended at its first token). A retry
            # released them when it started.
            if not decoded:
                release()

    def _finish_after_first(self, token: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if params.max_tokens <= 1:
            return "length"
        return None

    async def _prefill(self, req: SampleRequest, decision: policy.RoutingDecision,
                       views: dict[str, WorkerView]) -> tuple[Any, WorkerView | None]:
        """((handle, PrefillResult | None), worker) from the first prefill worker that
        answers, or (None, None) when all of them failed."""
        candidates = [decision.prefill_worker_id, *decision.fallback_prefill_ids][:self.prefill_attempts]
        for attempt, wid in enumerate(candidates):
            view = views[wid]
            if attempt:
                self.metrics.prefill_retries.labels(self.metrics.model).inc()
            self.metrics.routed.labels(self.metrics.model, wid, view.role).inc()
            client = self.client_for(view.address)
            self.num_inflight[wid] += 1
            self.pending_prefill_tokens[wid] += decision.uncached_tokens
            start = time.monotonic()
            try:
                if hasattr(client, "prefill_full"):
                    handle, result = await client.prefill_full(req.request_id, req.prompt_token_ids, req.params)
                else:
                    handle, result = await client.prefill(req.request_id, req.prompt_token_ids, req.params), None
            except asyncio.CancelledError:
                self._background(client.abort(req.request_id), "abort prefill", wid)
                raise
            except Exception as e:
                err = _worker_error(e, wid, "prefill")
                if isinstance(err, InvalidRequest):
                    raise err from e
                log.warning("request %s: prefill on %s failed (%s); trying the next worker",
                            req.request_id, wid, err.message)
                self._background(client.abort(req.request_id), "abort prefill", wid)
                continue
            finally:
                self.num_inflight[wid] -= 1
                self.pending_prefill_tokens[wid] -= decision.uncached_tokens
            self.metrics.phase("prefill", time.monotonic() - start)
            if result is not None:
                self.metrics.worker_phases({"prefill_queue": result.queue_seconds,
                                            "prefill_compute": result.prefill_seconds})
            return (handle, result), view
        return None, None

    async def _local(self, req: SampleRequest, decode: WorkerView) -> AsyncIterator[TokenChunk]:
        generate = lambda c: c.generate(req.request_id, req.prompt_token_ids, req.params)
        async with contextlib.aclosing(self._relay(req, [decode.worker_id], decode, "generate", generate,
                                                   generate, phase="local_first_token")) as stream:
            async for chunk in stream:
                yield chunk

    async def _relay(self, req: SampleRequest, tried: list[str], worker: WorkerView, what: str,
                     open_stream: Callable[[Any], AsyncIterator], retry: Callable[[Any], AsyncIterator],
                     phase: str = "decode_first_token", first_is_cached: bool = True,
                     on_retry: Callable[[], None] | None = None) -> AsyncIterator[TokenChunk]:
        """``_stream`` on ``worker``; if it fails before yielding a token, ``retry`` (a Generate)
        on the next other decode worker, up to ``decode_attempts`` workers in all (``tried``
        collects their ids; ``on_retry`` runs before each retry). A failure after tokens were
        yielded ends the sample."""
        try:
            while True:
                streamed = 0
                try:
                    stream = self._stream(req, worker, what, open_stream, phase, first_is_cached)
                    async with contextlib.aclosing(stream):
                        async for chunk in stream:
                            streamed += len(chunk.token_ids)
                            yield chunk
                    return
                except (WorkerFailed, QueueFull) as e:
                    if streamed:
                        raise WorkerFailed(f"{what} on worker {worker.worker_id} failed after {streamed} tokens "
                                           f"were streamed; the completion is cut short: {e.message}") from e
                    nxt = self._next_decode(req, set(tried)) if len(tried) < self.decode_attempts else None
                    if nxt is None:
                        raise
                    log.warning("request %s: %s on %s failed before its first token (%s); retrying on %s",
                                req.request_id, what, worker.worker_id, e.message, nxt.worker_id)
                if on_retry is not None:
                    on_retry()
                self.metrics.decode_retries.labels(self.metrics.model).inc()
                self.metrics.routed.labels(self.metrics.model, nxt.worker_id, nxt.role).inc()
                self.num_inflight[nxt.worker_id] += 1      # the first worker is counted by ``generate``
                tried.append(nxt.worker_id)
                worker, what, open_stream = nxt, "generate", retry
        finally:
            for wid in tried[1:]:
                self.num_inflight[wid] -= 1

    async def _stream(self, req: SampleRequest, worker: WorkerView, what: str,
                      open_stream: Callable[[Any], AsyncIterator], phase: str = "decode_first_token",
                      first_is_cached: bool = True) -> AsyncIterator[TokenChunk]:
        """Relay a worker's chunk stream; abort the worker's request unless it finished.
        ``num_cached_tokens`` is passed on from the first chunk of a Generate stream only
        (a Decode stream's count is the decode worker's, not the prompt's compute saving)."""
        client = self.client_for(worker.address)
        finished = False
        start = time.monotonic()
        first = True
        try:
            stream = open_stream(client)
            try:
                async for raw in stream:
                    cached = getattr(raw, "num_cached_tokens", None) if first and first_is_cached else None
                    chunk = TokenChunk(list(raw.token_ids), raw.finish_reason, cached,
                                       logprobs=getattr(raw, "logprobs", None))
                    if first and chunk.token_ids:
                        first = False
                        self.metrics.phase(phase, time.monotonic() - start)
                        transfer = getattr(raw, "kv_transfer_seconds", 0.0)
                        if not first_is_cached and transfer:
                            self.metrics.worker_phases({"kv_transfer": transfer})
                    finished = chunk.finish_reason is not None
                    yield chunk
                    if finished:
                        return
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except (asyncio.CancelledError, GeneratorExit, RequestError):
            raise
        except Exception as e:
            raise _worker_error(e, worker.worker_id, what) from e
        finally:
            if not finished:
                self._background(client.abort(req.request_id), f"abort {what}", worker.worker_id)
        if not finished:
            raise WorkerFailed(f"{what} stream on worker {worker.worker_id} ended without a finish reason")

    # ---- background cleanup -----------------------------------------------------
    def _background(self, coro, what: str, worker_id: str) -> None:
        task = asyncio.ensure_future(self._quietly(coro, what, worker_id))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _quietly(self, coro, what: str, worker_id: str) -> None:
        try:
            await asyncio.wait_for(coro, self.cleanup_timeout_s)
        except Exception as e:
            log.info("%s on worker %s failed: %s", what, worker_id, e)

    async def close(self) -> None:
        """Wait for pending aborts/releases."""
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
