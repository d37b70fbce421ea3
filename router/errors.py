"""The ways a request can fail, with their HTTP status and OpenAI error type.

Everything the user can get wrong is a ``RequestError`` raised *before* any
worker is touched. ``app.py`` turns it into ``{"error": {...}}`` with the
status, ``grpc_server.py`` into a gRPC status code.
"""

from __future__ import annotations


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class RequestError(Exception):
    status: int = 500
    type: str = "server_error"
    grpc_code: str = "INTERNAL"
    default_code: str | None = None   # ``code`` when the raiser names none

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(RequestError):
    """Bad input: 400 / INVALID_ARGUMENT."""
    status = 400
    type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(InvalidRequest):
    def __init__(self, model: str, served: tuple[str, ...]):
        super().__init__(f"The model `{model}` does not exist; this server serves "
                         f"{', '.join(served)}.", param="model", code="model_not_found")


class QueueFull(RequestError):
    """The router queue is full: 429 / RESOURCE_EXHAUSTED."""
    status = 429
    type = "rate_limit_error"
    grpc_code = "RESOURCE_EXHAUSTED"
    default_code = "queue_full"

    def __init__(self, message: str = "The server is busy: the request queue is full; retry later."):
        super().__init__(message)


class NoWorkerAvailable(RequestError):
    """No healthy, non-draining worker can take the request: 503 / UNAVAILABLE."""
    status = 503
    type = "service_unavailable"
    grpc_code = "UNAVAILABLE"
    default_code = "no_worker_available"


class WorkerFailed(RequestError):
    """A worker failed while serving the request: 502 / UNAVAILABLE."""
    status = 502
    type = "server_error"
    grpc_code = "UNAVAILABLE"
    default_code = "worker_failed"
