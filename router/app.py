"""The OpenAI-compatible HTTP API (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream and
non-stream), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

A request: the body is parsed and validated (``schemas.parse`` then
``Service.prepare_*``) — any problem is an HTTP 400/429 with an OpenAI error
body before a worker is touched. Then either

- non-stream: the deltas are collected into one response while a watcher
  waits for the client to go away (then the request is cancelled and every
  worker request aborted), or
- stream: Server-Sent Events framed as OpenAI's (``data: {json}\\n\\n``, then
  ``data: [DONE]\\n\\n``). Chat streams open with the role delta of every
  choice; a choice ends with an empty delta carrying ``finish_reason``; with
  ``stream_options.include_usage`` every chunk has ``"usage": null`` and a last
  chunk has empty ``choices`` and the usage. An error after the stream started
  is sent as a ``data: {"error": {...}}`` event before ``[DONE]``. Starlette
  cancels the stream when the client disconnects, which aborts the workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import schemas
from router.errors import RequestError, error_body
from router.service import Delta, Prepared, Service, TokenLogprob, Usage

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(service: Service, health: Callable[[], tuple[int, dict]], render_metrics: Callable[[], bytes],
              max_model_len: Callable[[], int], allow_origins: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(title="Baton router", version="0.1.0", docs_url=None, redoc_url=None)
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    names = service.model_names
    token_text = service.tokenizer.token_text

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.to_body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(_internal_error(e), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = schemas.parse(await request.body(), schemas.CompletionRequest)
        prepared = await service.prepare_completion(req)
        renderer = _CompletionRenderer(prepared, token_text)
        return await _respond(request, service, prepared, renderer)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = schemas.parse(await request.body(), schemas.ChatCompletionRequest)
        prepared = await service.prepare_chat(req)
        renderer = _ChatRenderer(prepared, token_text)
        return await _respond(request, service, prepared, renderer)

    @app.get("/v1/models")
    async def models() -> dict:
        return schemas.models_response(names, _STARTED, max_model_len())

    @app.get("/health")
    async def health_route() -> JSONResponse:
        status, body = health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


_STARTED = int(time.time())


async def _respond(request: Request, service: Service, prepared: Prepared, renderer: "_Renderer") -> Response:
    if prepared.stream:
        return StreamingResponse(_sse(service, prepared, renderer), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    body = await _until_disconnect(request, _collect(service, prepared, renderer))
    if body is None:   # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(body)


async def _collect(service: Service, prepared: Prepared, renderer: "_Renderer") -> dict:
    usage = None
    async for item in service.run(prepared):
        if isinstance(item, Usage):
            usage = item
        else:
            renderer.add(item)
    return renderer.response(usage)


async def _until_disconnect(request: Request, work) -> dict | None:
    """Run ``work``; cancel it (aborting its worker requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.info("client disconnected from %s: request aborted", request.url.path)
            return None
    return task.result()


def _internal_error(e: Exception) -> dict:
    """The body of an unexpected failure: its type only, never its message."""
    return error_body(f"internal error: {type(e).__name__}", "server_error")


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(service: Service, prepared: Prepared, renderer: "_Renderer") -> AsyncIterator[str]:
    for chunk in renderer.opening():
        yield _event(chunk)
    stream = service.run(prepared)
    try:
        async for item in stream:
            if isinstance(item, Usage):
                if prepared.include_usage:
                    yield _event(renderer.usage_chunk(item))
                continue
            for chunk in renderer.delta_chunks(item):
                yield _event(chunk)
    except RequestError as e:
        yield _event(e.to_body())
    except Exception as e:  # noqa: BLE001 - the stream is open: report, don't crash the connection
        log.exception("stream %s failed", prepared.request_id)
        yield _event(_internal_error(e))
    finally:
        await stream.aclose()
    yield _event("[DONE]")


class _Renderer:
    """Turns deltas into OpenAI chunks (stream) or one response (non-stream)."""

    def __init__(self, prepared: Prepared, token_text: Callable[[int], str]):
        self.p = prepared
        self.token_text = token_text
        n = prepared.num_samples
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.offsets = [0] * n

    def add(self, d: Delta) -> None:
        self.texts[d.index] += d.text
        if d.logprobs:
            self.logprobs[d.index].extend(d.logprobs)
        if d.finish_reason:
            self.finish[d.index] = d.finish_reason

    def _usage(self, usage: Usage | None) -> dict | None:
        if usage is None:
            return None
        return schemas.usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def opening(self) -> list[dict]:
        return []

    def _with_usage(self) -> bool:
        return self.p.include_usage


class _CompletionRenderer(_Renderer):
    def _logprobs(self, index: int, items: list[TokenLogprob] | None, offset: int) -> dict | None:
        if self.p.top_logprobs is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for it in items or []:
            text = self.token_text(it.token_id)
            tokens.append(text)
            lps.append(it.logprob)
            tops.append({self.token_text(t): lp for t, lp in it.top} if self.p.top_logprobs else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def delta_chunks(self, d: Delta) -> list[dict]:
        if not (d.text or d.finish_reason or d.logprobs):
            return []
        lp = self._logprobs(d.index, d.logprobs, self.offsets[d.index])
        self.offsets[d.index] += len(d.text)
        choice = schemas.completion_choice(d.index, d.text, d.finish_reason, lp)
        return [schemas.completion_chunk(self.p.request_id, self.p.created, self.p.model, [choice],
                                         None, self._with_usage())]

    def usage_chunk(self, usage: Usage) -> dict:
        return schemas.completion_chunk(self.p.request_id, self.p.created, self.p.model, [],
                                        self._usage(usage), True)

    def response(self, usage: Usage | None) -> dict:
        choices = [schemas.completion_choice(i, self.texts[i], self.finish[i],
                                             self._logprobs(i, self.logprobs[i], 0))
                   for i in range(len(self.texts))]
        return schemas.completion_response(self.p.request_id, self.p.created, self.p.model, choices,
                                           self._usage(usage))


class _ChatRenderer(_Renderer):
    def _entry(self, token_id: int, logprob: float | None) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, items: list[TokenLogprob] | None) -> dict | None:
        if self.p.top_logprobs is None:
            return None
        content = []
        for it in items or []:
            entry = self._entry(it.token_id, it.logprob)
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in it.top]
            content.append(entry)
        return {"content": content}

    def _chunk(self, choices: list[dict]) -> dict:
        return schemas.chat_chunk(self.p.request_id, self.p.created, self.p.model, choices, None,
                                  self._with_usage())

    def opening(self) -> list[dict]:
        return [self._chunk([schemas.chat_delta(i, {"role": "assistant", "content": ""})])
                for i in range(self.p.num_samples)]

    def delta_chunks(self, d: Delta) -> list[dict]:
        out = []
        if d.text or d.logprobs:
            out.append(self._chunk([schemas.chat_delta(d.index, {"content": d.text}, None,
                                                       self._logprobs(d.logprobs))]))
        if d.finish_reason:
            out.append(self._chunk([schemas.chat_delta(d.index, {}, d.finish_reason)]))
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        return schemas.chat_chunk(self.p.request_id, self.p.created, self.p.model, [], self._usage(usage), True)

    def response(self, usage: Usage | None) -> dict:
        choices = [schemas.chat_choice(i, self.texts[i], self.finish[i], self._logprobs(self.logprobs[i]))
                   for i in range(len(self.texts))]
        return schemas.chat_response(self.p.request_id, self.p.created, self.p.model, choices,
                                     self._usage(usage))
