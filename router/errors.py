"""The ways a request can fail, with their HTTP status and OpenAI error type.

Everything the user can get wrong is a ``RequestError`` raised *before* any
worker is touched. ``app.py`` turns it into ``{"error": {...}}`` with the
status, ``grpc_server.py`` into a gRPC status code.
"""

from __future__ import annotations


class RequestError(Exception):
    status: int = 500
    type: str = "server_error"
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


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

    def __init__(self, message: str = "The server is busy: the request queue is full; retry later."):
        super().__init__(message, code="queue_full")


class NoWorkerAvailable(RequestError):
    """No healthy, non-draining worker can take the request: 503 / UNAVAILABLE."""
    status = 503
    type = "service_unavailable"
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str):
        super().__init__(message, code="no_worker_available")


class WorkerFailed(RequestError):
    """A worker failed while serving the request: 502 / UNAVAILABLE."""
    status = 502
    type = "server_error"
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str):
        super().__init__(message, code="worker_failed")
