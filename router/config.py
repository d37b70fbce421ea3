"""RouterConfig: every knob of the router, validated once, frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.keys import DEFAULT_NAMESPACE


@dataclass(frozen=True)
class RouterConfig:
    model: str = "smollm2-135m"
    """Name the API serves (``model`` field of requests, ``/v1/models``) and the
    model part of the prefix-index keys."""
    tokenizer: str | None = None
    """Tokenizer path for ``engine.tokenizer.Tokenizer.from_path``; None: ``model``."""
    served_model_aliases: tuple[str, ...] = ()
    """Extra names accepted in the ``model`` field."""
    host: str = "0.0.0.0"
    """Interface both servers bind."""
    http_port: int = 8000
    """OpenAI-compatible HTTP API."""
    grpc_port: int = 50051
    """Public gRPC API; 0 disables it."""
    redis_url: str | None = None
    """Redis holding the worker registry and the prefix index; None: in-process index
    and a static worker list."""
    namespace: str = DEFAULT_NAMESPACE
    """Redis key namespace (``cluster.keys``)."""
    workers: tuple[tuple[str, str, str], ...] = ()
    """Static worker list ``(worker_id, role, address)``, used when ``redis_url`` is None."""
    max_model_len: int | None = None
    """Context limit for prompt + completion; None: the smallest one the workers
    report, else ``default_max_model_len``."""
    default_max_model_len: int = 8192
    """Context limit when neither the config nor any worker gives one."""
    local_prefill_threshold: int = 256
    """Prefill on the decode worker itself when at most this many prompt tokens
    are uncached there (conditional disaggregation); 0 always disaggregates when
    a prefill worker exists."""
    decode_affinity_slack: int = 2
    """A decode worker holding more of the prompt wins over the least loaded one
    if it runs at most this many more requests."""
    max_running: int = 256
    """Samples in flight towards the workers at once."""
    max_queue: int = 1024
    """Requests waiting for a slot; one more is refused with 429 / RESOURCE_EXHAUSTED."""
    prefill_attempts: int = 3
    """Prefill workers tried (each a different one) before prefilling locally."""
    decode_attempts: int = 2
    """Decode workers tried (each a different one) for a sample whose decode or
    generate stream fails before its first token."""
    directory_refresh_s: float = 1.0
    """How often the worker set and their load are refreshed."""
    worker_stats_timeout_s: float = 0.5
    """Timeout of one worker stats poll."""
    worker_unhealthy_after: int = 3
    """Stats polls timed out in a row before a worker counts as unhealthy (a poll
    that errs — connection refused — counts at once)."""
    index_timeout_s: float = 0.1
    """Timeout of one prefix-index round trip (then: route by load alone)."""
    index_epoch_ttl_s: float = 1.0
    """How long the live epochs of workers are cached by the index reader."""
    max_index_blocks: int = 1024
    """Leading blocks of a prompt looked up in the index (longer prompts: the rest
    counts as uncached)."""
    allow_origins: tuple[str, ...] = field(default=())
    """CORS origins for the HTTP API (empty: no CORS middleware)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        if self.decode_affinity_slack < 0:
            raise ValueError("decode_affinity_slack must be >= 0")
        if self.max_running < 1:
            raise ValueError("max_running must be >= 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.prefill_attempts < 1:
            raise ValueError("prefill_attempts must be >= 1")
        if self.decode_attempts < 1:
            raise ValueError("decode_attempts must be >= 1")
        if self.worker_unhealthy_after < 1:
            raise ValueError("worker_unhealthy_after must be >= 1")
        for name in ("directory_refresh_s", "worker_stats_timeout_s", "index_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for w in self.workers:
            if len(w) != 3 or w[1] not in ("prefill", "decode", "colocated"):
                raise ValueError(f"workers entries are (worker_id, role, address) with role "
                                 f"prefill|decode|colocated, got {w!r}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model, *self.served_model_aliases)
