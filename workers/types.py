"""Plain dataclasses the worker client returns (torch-free; the router imports them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import EngineStats
from kvtransfer.layout import KVLayout


@dataclass
class DecodeChunk:
    """New tokens of one completion since its previous chunk. A Decode stream does
    not repeat the first token (it came with the KVHandle); a Generate stream
    starts with it. ``token_ids`` are authoritative; ``text`` is the worker's
    detokenization (stop strings already cut, held back while ambiguous)."""
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None          # "stop" | "length" | "abort" on the last chunk
    num_cached_tokens: int = 0                # prompt tokens served by this worker's prefix cache
    index: int = 0                            # completion index (n > 1)
    logprobs: list[dict[int, float]] | None = None
    kv_transfer_seconds: float = 0.0          # Decode, first chunk: KV pull time
    kv_transfer_bytes: int = 0


@dataclass
class PrefillResult:
    """Everything Worker.Prefill returns besides the handle (``WorkerClient.prefill_full``)."""
    first_text: str = ""
    finish_reason: str | None = None          # request complete at its first token: skip Decode
    num_cached_tokens: int = 0
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    first_logprobs: dict[int, float] | None = None   # params.logprobs set: the first token's top entry


@dataclass(kw_only=True)
class WorkerStats(EngineStats):
    """A worker's snapshot: its engine's stats — inherited, so the load numbers stay
    top-level fields, as the flat proto message (``wire.py``), the router and the
    controller's ``as_dict`` read them — plus the worker's identity and KV transfer
    counters."""
    worker_id: str
    role: str
    address: str
    epoch: str
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_failures: int = 0
    num_expired_holds: int = 0
    metrics_port: int = 0
    layout: KVLayout | None = None
    max_model_len: int = 0
    max_waiting: int = 0
    extra: dict = field(default_factory=dict)
