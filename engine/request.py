"""Request, RequestStatus, SamplingParams: one object per request, end to end.

Lifecycle of a Request inside the engine:
WAITING → (scheduled) RUNNING → FINISHED_*; RUNNING → PREEMPTED (blocks freed,
recompute) → RUNNING; WAITING_FOR_KV (decode worker: blocks allocated, KV being
pulled) → RUNNING; prefill mode: RUNNING → HELD (first token sampled, blocks
kept) → FINISHED_* on release/TTL.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    HELD = "held"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass
class SamplingParams:
    """What to sample and when to stop. Validated in ``__post_init__`` (ValueError → HTTP 400)."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1          # -1 or 0: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # number of top logprobs per generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= float(self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Request:
    """One sequence. ``token_ids`` = prompt + output; the scheduler advances
    ``num_computed_tokens`` until it equals ``len(token_ids)`` (then the model's
    last logits give the next token)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), arrival_time: float | None = None,
                 parent_id: str | None = None, sample_index: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0          # prompt tokens served by the prefix cache (first schedule)
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []   # hashes of full blocks, chained
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.parent_id = parent_id          # n > 1: id of the group
        self.sample_index = sample_index
        self.output_logprobs: list[dict[int, float]] = []
        self.stop_reason: int | str | None = None
        self.held_since: float | None = None
        self.generator = None               # torch.Generator for seeded sampling (set by the engine)
        self.pending_children: list[Request] = []   # n > 1: samples forked when this prompt is done
        # scheduled but not yet through ``Scheduler.update`` (async scheduling keeps one
        # step in flight): tokens being computed, and samples whose token is not known yet
        self.num_inflight_tokens = 0
        self.num_inflight_samples = 0
        # the engine's output processing
        self.num_detokenized = 0            # output tokens fed to the detokenizer
        self.text_cut: int | None = None    # text length when a stop string matched
        # characters a stream holds back: a stop string could still be starting there
        self.stop_holdback = max((len(s) for s in params.stop), default=1) - 1
        self.first_token: int | None = None  # decode side: first token sampled by the prefill side

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed or being computed (the next step starts here)."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def num_expected_tokens(self) -> int:
        """Tokens once the in-flight samples land (their ids are placeholders until then)."""
        return len(self.token_ids) + self.num_inflight_samples

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_ids})")
