"""A whole request, frontend-agnostic: the HTTP app and the gRPC server both use it.

Lifecycle of a request:

1. ``prepare_completion`` / ``prepare_chat`` — validate everything (model,
   unsupported fields, prompt, context length, sampling values), tokenize (chat
   template), and check the router queue has room (``QueueFull`` → 429). No
   worker is touched; every failure is a ``RequestError``.
2. ``run`` — wait for ``n × prompts`` slots in the router queue, then run every
   sample through the orchestrator concurrently and merge their streams: a
   ``Delta`` per chunk (index, text, token ids, finish reason, logprobs), then
   one final ``Usage``. Closing the stream early (client gone) closes every
   sample, which aborts their worker requests.

Decision — ``n > 1`` fans out: ``n`` independent samples, each its own request
on the cluster (routed on its own; the prefix index sends the siblings where
the prompt is now cached). The siblings share one cache of the prompt's block
hashes (``Prepared.block_hashes``), so a prompt is hashed once per request. With a ``seed``, sample ``i`` uses ``seed + i`` so the
samples differ yet are reproducible. Choice index = ``prompt_index * n + i``
(OpenAI's order for a list of prompts).

Default ``max_tokens``: 16 for completions (OpenAI's legacy default), the rest
of the context window for chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from engine.request import SamplingParams
from router.admission import Admission
from router.detokenize import SampleText
from router.errors import InvalidRequest, ModelNotFound, RequestError, WorkerFailed
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator, SampleRequest
from router.schemas import (ChatCompletionRequest, CompletionRequest, _Common, message_text,
                            refuse_unsupported)
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)

_INT64 = 2 ** 63
_SAMPLING_FIELDS = ("n", "max_tokens", "temperature", "top_p", "min_p", "top_k", "logprobs", "stop",
                    "stop_token_ids")


@dataclass
class Prepared:
    """A validated, tokenized request, ready to run."""
    request_id: str
    kind: str                         # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    params: SamplingParams            # n = samples per prompt
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None   # None: no logprobs
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    # per prompt: its block hashes by block size, shared by the prompt's n samples
    block_hashes: list[dict[int, list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.block_hashes:
            self.block_hashes = [{} for _ in self.prompts]

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]      # best first, at most top_logprobs entries


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Service:
    def __init__(self, model_names: tuple[str, ...], tokenizer: RouterTokenizer, orchestrator: Orchestrator,
                 admission: Admission, metrics: RouterMetrics, max_model_len: Callable[[], int]):
        self.model_names = model_names
        self.tokenizer = tokenizer
        self.orchestrator = orchestrator
        self.admission = admission
        self.metrics = metrics
        self.max_model_len = max_model_len

    # ---- 1. prepare ---------------------------------------------------------------
    async def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self._check_common(req)
        prompts = await self._completion_prompts(req.prompt)
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidRequest("logprobs must be in [0, 20]", param="logprobs")
        params = self._params(req, prompts, default_max_tokens=16, logprobs=req.logprobs)
        return self._ready(Prepared(f"cmpl-{uuid.uuid4().hex}", "completion", req.model, prompts, params,
                                    req.stream, self._include_usage(req), req.logprobs))

    async def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check_common(req)
        messages = []
        for i, m in enumerate(req.messages):
            msg = {"role": m.role, "content": message_text(m, i)}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            ids = await self.tokenizer.arender_chat(messages, req.add_generation_prompt,
                                                    **(req.chat_template_kwargs or {}))
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequest(f"messages could not be rendered with the chat template: {e}",
                                 param="messages") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if top is not None and not 0 <= top <= 20:
            raise InvalidRequest("top_logprobs must be in [0, 20]", param="top_logprobs")
        if req.max_completion_tokens is not None:
            req = req.model_copy(update={"max_tokens": req.max_completion_tokens})
        params = self._params(req, [ids], default_max_tokens=None, logprobs=top, prompt_param="messages")
        return self._ready(Prepared(f"chatcmpl-{uuid.uuid4().hex}", "chat", req.model, [ids], params,
                                    req.stream, self._include_usage(req), top))

    def _check_common(self, req: _Common) -> None:
        if req.model not in self.model_names:
            raise ModelNotFound(req.model, self.model_names)
        refuse_unsupported(req)

    @staticmethod
    def _include_usage(req: _Common) -> bool:
        return bool(req.stream and req.stream_options and req.stream_options.include_usage)

    async def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            batch: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            batch = [prompt]
        else:
            batch = list(prompt)
        if not batch:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        prompts = []
        for item in batch:
            ids = await self.tokenizer.aencode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            prompts.append(ids)
        self._check_token_ids(prompts)
        return prompts

    def _check_token_ids(self, prompts: list[list[int]]) -> None:
        vocab = self.tokenizer.vocab_size
        for ids in prompts:
            bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
            if bad is not None:
                raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                                     param="prompt", code="invalid_token_id")

    def _params(self, req: _Common, prompts: list[list[int]], default_max_tokens: int | None,
                logprobs: int | None, prompt_param: str = "prompt") -> SamplingParams:
        limit = self.max_model_len()
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, your "
                                 f"{prompt_param} has {longest} tokens, leaving no room for a completion. Please "
                                 f"reduce the length of the {prompt_param}.", param=prompt_param,
                                 code="context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else limit - longest
            max_tokens = min(max_tokens, limit - longest)
        elif isinstance(max_tokens, int) and max_tokens >= 1 and longest + max_tokens > limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, you "
                                 f"requested {longest + max_tokens} tokens ({longest} in the {prompt_param}, "
                                 f"{max_tokens} in the completion). Please reduce the length of the "
                                 f"{prompt_param} or completion.", param="max_tokens", code="context_length_exceeded")
        if req.seed is not None and not -_INT64 <= req.seed < _INT64:
            raise InvalidRequest("seed must fit in a signed 64-bit integer", param="seed")
        if req.stop_token_ids and any(t >= _INT64 for t in req.stop_token_ids):
            raise InvalidRequest("stop_token_ids out of range", param="stop_token_ids")
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                seed=req.seed, stop=list([req.stop] if isinstance(req.stop, str) else (req.stop or [])),
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                logprobs=logprobs, skip_special_tokens=req.skip_special_tokens)
        except (ValueError, TypeError) as e:
            word = str(e).split(" ", 1)[0]
            raise InvalidRequest(str(e), param=word if word in _SAMPLING_FIELDS else None,
                                 code="invalid_value") from None

    def _ready(self, prepared: Prepared) -> Prepared:
        self.admission.check(prepared.num_samples)
        return prepared

    # ---- 2. run -------------------------------------------------------------------
    async def run(self, prepared: Prepared) -> AsyncIterator[Delta | Usage]:
        """Deltas of every sample, interleaved, then one ``Usage``."""
        try:
            async with self.admission.admit(prepared.num_samples) as waited:
                self.metrics.queue_time.labels(self.metrics.model).observe(waited)
                self.metrics.phase("router_queue", waited)
                tally = _Tally(prepared, self.metrics)
                samples = [self._sample(prepared, p, i, tally)
                           for p in range(len(prepared.prompts)) for i in range(prepared.params.n)]
                stream = samples[0] if len(samples) == 1 else merge(samples)
                async with contextlib.aclosing(stream):
                    async for delta in stream:
                        yield delta
                self.metrics.e2e.labels(self.metrics.model).observe(time.monotonic() - prepared.arrival)
                usage = tally.usage()
                self.metrics.prompt_tokens.labels(self.metrics.model).inc(usage.prompt_tokens)
                self.metrics.generation_tokens.labels(self.metrics.model).inc(usage.completion_tokens)
                self.metrics.cached_tokens.labels(self.metrics.model).inc(usage.cached_tokens)
                yield usage
        except RequestError as e:
            self.metrics.errors.labels(self.metrics.model, e.code or type(e).__name__).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            log.exception("request %s failed", prepared.request_id)
            self.metrics.errors.labels(self.metrics.model, "internal").inc()
            raise WorkerFailed(f"internal error: {type(e).__name__}: {e}") from e

    async def _sample(self, prepared: Prepared, prompt_index: int, i: int, tally: "_Tally"
                      ) -> AsyncIterator[Delta]:
        index = prompt_index * prepared.params.n + i
        prompt = prepared.prompts[prompt_index]
        base = prepared.params
        params = replace(base, n=1, seed=None if base.seed is None else base.seed + i)
        sample = SampleRequest(f"{prepared.request_id}-{index}", prompt, params, prepared.arrival,
                               prepared.block_hashes[prompt_index])
        text = SampleText(self.tokenizer.detokenizer(prompt, params.skip_special_tokens), params.stop,
                          self.tokenizer.eos_token_ids, params.ignore_eos)
        last = None
        async with contextlib.aclosing(self.orchestrator.generate(sample)) as chunks:
            async for chunk in chunks:
                now = time.monotonic()
                tally.add(prompt_index, chunk.num_cached_tokens, len(chunk.token_ids))
                if chunk.token_ids:
                    if last is None:
                        tally.first_token(now)
                    else:
                        self.metrics.itl.labels(self.metrics.model).observe((now - last) / len(chunk.token_ids))
                    last = now
                delta, stopped = text.feed(chunk.token_ids)
                finish = "stop" if stopped else chunk.finish_reason
                if finish is not None:
                    delta += text.finish()
                yield Delta(index, delta, list(chunk.token_ids), finish,
                            self._logprobs(chunk.token_ids, chunk.logprobs, prepared.top_logprobs))
                if finish is not None:
                    self.metrics.success.labels(self.metrics.model, finish).inc()
                    return

    def _logprobs(self, token_ids: list[int], raw: list | None, top_n: int | None) -> list[TokenLogprob] | None:
        if top_n is None:
            return None
        out = []
        for j, tok in enumerate(token_ids):
            entry = raw[j] if raw is not None and j < len(raw) else None
            if isinstance(entry, dict):
                top = sorted(((int(t), float(lp)) for t, lp in entry.items()), key=lambda x: -x[1])[:top_n]
                out.append(TokenLogprob(tok, entry.get(tok), top))
            elif isinstance(entry, (int, float)):
                out.append(TokenLogprob(tok, float(entry), []))
            else:
                out.append(TokenLogprob(tok, None, []))
        return out


class _Tally:
    """Usage and request-level metrics of one running request."""

    def __init__(self, prepared: Prepared, metrics: RouterMetrics):
        self.prepared = prepared
        self.metrics = metrics
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}
        self.first_token_at: float | None = None

    def add(self, prompt_index: int, cached: int | None, num_tokens: int) -> None:
        self.completion_tokens += num_tokens
        if cached is not None:
            self.cached[prompt_index] = max(self.cached.get(prompt_index, 0), cached)

    def first_token(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.labels(self.metrics.model).observe(now - self.prepared.arrival)

    def usage(self) -> Usage:
        return Usage(sum(len(p) for p in self.prepared.prompts), self.completion_tokens,
                     sum(self.cached.values()))


async def merge(streams: list[AsyncIterator]) -> AsyncIterator:
    """Interleave async iterators as items arrive. The first error ends the merge;
    closing the merge (or an error) cancels and closes every stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((item, None))
            queue.put_nowait((done, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait((done, e))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
