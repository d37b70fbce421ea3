"""The public gRPC API (``protos/serving.proto``) and the standard health service.

A ``GenerateRequest`` is turned into the same pydantic request the HTTP API
builds (a completion for ``prompt`` / ``prompt_token_ids``, a chat completion
for ``chat``), so both APIs share every validation rule and the same
``Service``. ``RequestError`` maps to its gRPC code (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAVAILABLE); a cancelled call cancels the handler task,
which closes the request's streams and aborts its worker requests.

Lifecycle: ``build_grpc_server`` adds the servicers to a ``grpc.aio`` server
bound to the port; ``start()`` / ``stop(grace)`` are the caller's (see
``router/server.py``). ``HealthReporter.update(serving)`` flips the health
status as workers come and go.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from protos.gen import serving_pb2, serving_pb2_grpc
from router import schemas
from router.errors import InvalidRequest, RequestError
from router.service import Delta, Prepared, Service, TokenLogprob, Usage

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.serving.v1.Serving"


def _sampling_dict(s: serving_pb2.SamplingParameters) -> dict:
    out: dict = {"n": s.n or 1, "ignore_eos": s.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed"):
        if s.HasField(name):
            out[name] = getattr(s, name)
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    return out


def to_openai(request: serving_pb2.GenerateRequest) -> schemas.CompletionRequest | schemas.ChatCompletionRequest:
    """The equivalent HTTP request body (validated by pydantic)."""
    body = {"model": request.model, **_sampling_dict(request.sampling)}
    if request.user:
        body["user"] = request.user
    logprobs = request.sampling.logprobs if request.sampling.HasField("logprobs") else None
    kind = request.WhichOneof("input")
    if kind == "prompt":
        body["prompt"] = request.prompt
    elif kind == "prompt_token_ids":
        body["prompt"] = list(request.prompt_token_ids.ids)
    elif kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                            for m in request.chat.messages]
    else:
        raise InvalidRequest("one of prompt, prompt_token_ids or chat is required", param="input")
    if kind == "chat":
        if logprobs is not None:
            body.update(logprobs=True, top_logprobs=logprobs)
        return schemas.validate(body, schemas.ChatCompletionRequest)
    if logprobs is not None:
        body["logprobs"] = logprobs
    return schemas.validate(body, schemas.CompletionRequest)


def _logprobs(items: list[TokenLogprob] | None) -> list[serving_pb2.TokenLogprob]:
    return [serving_pb2.TokenLogprob(token_id=it.token_id, logprob=it.logprob or 0.0,
                                     top_token_ids=[t for t, _ in it.top], top_logprobs=[lp for _, lp in it.top])
            for it in items or []]


def _usage(u: Usage) -> serving_pb2.Usage:
    return serving_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                             total_tokens=u.prompt_tokens + u.completion_tokens, cached_tokens=u.cached_tokens)


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, service: Service, max_model_len: Callable[[], int]):
        self.service = service
        self.max_model_len = max_model_len

    async def _prepare(self, request) -> Prepared:
        req = to_openai(request)
        if isinstance(req, schemas.ChatCompletionRequest):
            return await self.service.prepare_chat(req)
        return await self.service.prepare_completion(req)

    async def Generate(self, request, context):
        try:
            prepared = await self._prepare(request)
            n = prepared.num_samples
            texts, ids = [""] * n, [[] for _ in range(n)]
            finish, lps = [""] * n, [[] for _ in range(n)]
            usage = None
            async for item in self.service.run(prepared):
                if isinstance(item, Usage):
                    usage = item
                    continue
                texts[item.index] += item.text
                ids[item.index] += item.token_ids
                lps[item.index] += item.logprobs or []
                if item.finish_reason:
                    finish[item.index] = item.finish_reason
        except RequestError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
        completions = [serving_pb2.Completion(index=i, text=texts[i], token_ids=ids[i], finish_reason=finish[i],
                                              logprobs=_logprobs(lps[i])) for i in range(n)]
        return serving_pb2.GenerateResponse(request_id=prepared.request_id, model=prepared.model,
                                            completions=completions, usage=_usage(usage) if usage else None)

    async def GenerateStream(self, request, context):
        try:
            prepared = await self._prepare(request)
            async for item in self.service.run(prepared):
                if isinstance(item, Usage):
                    yield serving_pb2.GenerateStreamResponse(request_id=prepared.request_id, usage=_usage(item))
                    continue
                yield self._piece(prepared, item)
        except RequestError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)

    @staticmethod
    def _piece(prepared: Prepared, d: Delta) -> serving_pb2.GenerateStreamResponse:
        return serving_pb2.GenerateStreamResponse(
            request_id=prepared.request_id, index=d.index, text=d.text, token_ids=d.token_ids,
            finish_reason=d.finish_reason or "", logprobs=_logprobs(d.logprobs))

    async def ListModels(self, request, context):
        limit = self.max_model_len()
        return serving_pb2.ListModelsResponse(
            models=[serving_pb2.Model(id=name, max_model_len=limit) for name in self.service.model_names])


class HealthReporter:
    """grpc.health.v1 for "" and the Serving service."""

    def __init__(self):
        self.servicer = health_aio.HealthServicer()
        self.serving: bool | None = None

    async def update(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def build_grpc_server(service: Service, max_model_len: Callable[[], int], host: str, port: int
                      ) -> tuple[grpc.aio.Server, HealthReporter, int]:
    """A grpc.aio server with Serving + Health, bound (not started). Returns the bound port."""
    server = grpc.aio.server()
    serving_pb2_grpc.add_ServingServicer_to_server(ServingServicer(service, max_model_len), server)
    health = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    return server, health, bound
