"""OpenAI request bodies (pydantic) and the response dicts.

Requests are validated in two steps: pydantic checks the types (``parse``), then
``router/service.py`` checks the meaning (model, context length, sampling
values via ``engine.request.SamplingParams``). Both raise ``InvalidRequest``,
so every bad input is an HTTP 400 with an OpenAI error body and never reaches
a worker. Unknown fields are ignored (as OpenAI and vLLM do); known fields
Baton cannot honour (``echo``, ``suffix``, ``best_of`` != n, non-zero penalties,
``logit_bias``, tools) are refused rather than silently dropped.

Responses are plain dicts built by the ``*_response`` / ``*_chunk`` helpers,
shaped exactly as OpenAI's (``object`` names, ``choices``, ``usage`` with
``prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from router.errors import InvalidRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: StrictBool = True


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict | None = None


T = TypeVar("T", bound=BaseModel)


def parse(body: bytes, model: type[T]) -> T:
    """JSON bytes → request model, or ``InvalidRequest`` naming the bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object", code="invalid_json")
    return validate(data, model)


def validate(data: dict, model: type[T]) -> T:
    """A decoded request body → request model, or ``InvalidRequest`` naming the bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for i, p in enumerate(err["loc"]) if i == 0 or _is_path_part(p)) or None
        n_more = len(e.errors()) - 1
        more = f" (and {n_more} more error{'s' * (n_more > 1)})" if n_more else ""
        raise InvalidRequest(f"{param or 'body'}: {err['msg']}{more}", param=param,
                             code="invalid_value") from None


def _is_path_part(part) -> bool:
    """A field name or list index in a pydantic error location (not a union branch tag)."""
    if isinstance(part, int):
        return True
    return "[" not in part and part not in ("str", "int", "float", "bool") and not part[:1].isupper()


def refuse_unsupported(req: _Common) -> None:
    """Known OpenAI fields Baton cannot honour: refuse rather than ignore."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise InvalidRequest(f"{name} is not supported", param=name, code="unsupported")
    if req.repetition_penalty not in (None, 1, 1.0):
        raise InvalidRequest("repetition_penalty is not supported", param="repetition_penalty",
                             code="unsupported")
    if req.logit_bias:
        raise InvalidRequest("logit_bias is not supported", param="logit_bias", code="unsupported")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise InvalidRequest("echo is not supported", param="echo", code="unsupported")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix", code="unsupported")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequest("best_of different from n is not supported", param="best_of",
                                 code="unsupported")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.tool_choice not in (None, "none"):
            raise InvalidRequest("tools are not supported", param="tools", code="unsupported")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise InvalidRequest("response_format other than text is not supported",
                                 param="response_format", code="unsupported")


def message_text(msg: ChatMessage, index: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"messages[{index}].content: only text parts are supported, got "
                                 f"{part.type!r}", param=f"messages.{index}.content", code="unsupported")
        parts.append(part.text)
    return "".join(parts)


# ---- responses -------------------------------------------------------------------

def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict],
                     usage: dict | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def chat_response(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage: dict | None = None, with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def chat_delta(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def models_response(names: tuple[str, ...], created: int, max_model_len: int | None) -> dict:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "baton", "root": names[0],
         "max_model_len": max_model_len} for name in names]}
