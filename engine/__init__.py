"""Baton's engine: one process, one model — paged KV, continuous batching,
chunked prefill, prefix caching. No Ray, gRPC or Redis imports here."""

from engine.config import EngineConfig
from engine.request import RequestStatus, SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestStatus", "SamplingParams"]


def __getattr__(name):  # lazy: `import engine.hashing` stays torch-free for the router
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
