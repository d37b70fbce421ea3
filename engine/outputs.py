"""The contracts between scheduler, runner and caller (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field


PLACEHOLDER = -1
"""A token id in ``ScheduledRequest.token_ids`` not known on the host yet: the
request's sample of the step still in flight (async scheduling). The runner
takes it from that step's sampled ids on the device."""


@dataclass
class ScheduledRequest:
    """One request's slice of a step: compute tokens [start, start+num_tokens)."""
    request_id: str
    token_ids: list[int]        # the tokens to feed this step (the last may be PLACEHOLDER)
    start_pos: int              # position of token_ids[0] (= num_computed_tokens before the step)
    block_ids: list[int]        # the request's whole block table
    sample: bool                # True when this step reaches the end of the request's tokens


@dataclass
class SchedulerOutput:
    """What to run this step, in batch order. ``copy_blocks`` are (src, dst) CoW copies
    the runner performs before the forward."""
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.copy_blocks


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class RunnerOutput:
    """request_id → sampled token, for requests with ``sample=True`` only."""
    sampled: dict[str, SampledToken] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """What the caller sees for one request (streaming: after every step with news).

    ``token_ids``/``text`` are those of the first completion; ``outputs`` holds
    all ``n`` completions. ``new_token_ids``/``new_text`` are the delta since the
    previous RequestOutput of this request (streaming)."""
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class BlockEvent:
    """Prefix-cache event for the index: kind is 'stored', 'removed' or 'cleared'."""
    kind: str
    block_hashes: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_held: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0      # of which found cached
    num_preemptions: int = 0


@dataclass
class HeldRequest:
    """Prefill mode: a finished prompt whose blocks are kept for the decode side."""
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    block_ids: list[int]
    held_since: float
    first_logprob: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class KVPlan:
    """Decode side: blocks allocated for a request whose KV arrives from elsewhere."""
    request_id: str
    block_ids: list[int]
    num_cached_blocks: int
    num_cached_tokens: int

    @property
    def missing_block_ids(self) -> list[int]:
        return self.block_ids[self.num_cached_blocks:]
