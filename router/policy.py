"""Routing decisions: pure functions, dataclasses in, a ``RoutingDecision`` out.

Three questions per sample, answered from a snapshot of the workers (their load
and how many leading blocks of this prompt each already holds):

1. **Decode worker** (role ``decode`` or ``colocated``): among the healthy,
   non-draining ones with room for the prompt's blocks, the least loaded
   (running + waiting requests). Prefix affinity may override load: a worker
   holding more of the prompt wins if it runs at most ``decode_affinity_slack``
   more requests than the least loaded one. Ties: more free blocks, then the
   worker id (deterministic).
2. **Local or remote prefill** (conditional disaggregation): if at most
   ``local_prefill_threshold`` prompt tokens are uncached on the chosen decode
   worker, it prefills locally — shipping KV would cost more than computing it.
   Also local when no prefill worker can take the request.
3. **Prefill worker** (role ``prefill``): the smallest estimated time to the
   first token, counted in tokens: the uncached part of this prompt on that
   worker plus the uncached prompt tokens already pending there. Prefix overlap
   and load thus trade off in one unit. Ties: fewer requests, then worker id.

The load the router sees may be a second old (stats refresh); ``num_inflight``
(samples this router has outstanding on the worker) keeps bursts from piling
onto one worker: the load used is the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class PolicyConfig:
    local_prefill_threshold: int = 256
    """Prefill on the decode worker when at most this many prompt tokens are uncached there."""
    decode_affinity_slack: int = 2
    """Extra running requests a decode worker may have and still win on prefix overlap."""


@dataclass(frozen=True)
class WorkerState:
    """One worker as the policy sees it, for one request."""
    worker_id: str
    role: str
    healthy: bool = True
    draining: bool = False
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int | None = None      # None: unknown (treated as room)
    num_inflight: int = 0                   # samples this router has outstanding there
    pending_prefill_tokens: int = 0         # uncached prompt tokens this router sent, unanswered
    cached_blocks: int = 0                  # leading blocks of this prompt the worker holds

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    @property
    def load(self) -> int:
        return max(self.num_running + self.num_waiting, self.num_inflight)


@dataclass(frozen=True)
class RoutingRequest:
    num_prompt_tokens: int
    block_size: int
    max_tokens: int = 1

    @property
    def num_prompt_blocks(self) -> int:
        return -(-self.num_prompt_tokens // self.block_size)

    def uncached_tokens(self, worker: WorkerState) -> int:
        # A worker never skips the whole prompt: the last token is always recomputed.
        cached = min(worker.cached_blocks * self.block_size, self.num_prompt_tokens - 1)
        return self.num_prompt_tokens - max(cached, 0)


@dataclass(frozen=True)
class RoutingDecision:
    mode: str                               # "remote" (prefill worker + decode worker) or "local"
    decode_worker_id: str
    prefill_worker_id: str | None
    uncached_tokens: int                    # prompt tokens the prefilling worker must compute
    code: str                               # short reason, a metric label
    reason: str                             # the same, for humans and logs
    fallback_prefill_ids: tuple[str, ...] = field(default=())   # next prefill workers to try

    @property
    def disaggregated(self) -> bool:
        return self.mode == "remote"


class NoCandidate(Exception):
    """No worker of the needed role is healthy and not draining."""


def choose_decode_worker(request: RoutingRequest, workers: list[WorkerState],
                         config: PolicyConfig) -> tuple[WorkerState, str]:
    candidates = [w for w in workers if w.role in ("decode", "colocated") and w.available]
    if not candidates:
        raise NoCandidate("no healthy, non-draining decode or colocated worker")
    needed = request.num_prompt_blocks + 1
    with_room = [w for w in candidates if w.num_free_blocks is None or w.num_free_blocks >= needed]
    note = ""
    if not with_room:
        with_room, note = candidates, f"; none has {needed} free blocks, it will queue"
    least = min(w.load for w in with_room)
    near = [w for w in with_room if w.load <= least + config.decode_affinity_slack]
    best = min(near, key=lambda w: (-w.cached_blocks, w.load, -(w.num_free_blocks or 0), w.worker_id))
    if best.cached_blocks and best.load > least:
        why = f"holds {best.cached_blocks} prompt blocks at load {best.load} (least {least})"
    else:
        why = f"least loaded ({best.load} requests)"
    return best, why + note


def rank_prefill_workers(request: RoutingRequest, workers: list[WorkerState],
                         exclude: frozenset[str] = frozenset()) -> list[WorkerState]:
    """Prefill candidates, best first: least (uncached tokens + pending tokens)."""
    candidates = [w for w in workers
                  if w.role == "prefill" and w.available and w.worker_id not in exclude]
    return sorted(candidates, key=lambda w: (request.uncached_tokens(w) + w.pending_prefill_tokens,
                                             w.load, w.worker_id))


def route(request: RoutingRequest, workers: list[WorkerState], config: PolicyConfig,
          exclude_prefill: frozenset[str] = frozenset()) -> RoutingDecision:
    """The whole decision. Raises ``NoCandidate`` when no decode-capable worker is available."""
    if request.num_prompt_tokens < 1:
        raise ValueError("a request needs at least one prompt token")
    decode, decode_why = choose_decode_worker(request, workers, config)
    local_uncached = request.uncached_tokens(decode)

    def local(code: str, reason: str) -> RoutingDecision:
        return RoutingDecision("local", decode.worker_id, None, local_uncached, code,
                               f"{reason}; decode on {decode.worker_id}: {decode_why}")

    if decode.role == "colocated" and not any(w.role == "prefill" for w in workers):
        return local("colocated", "colocated workers only")
    if local_uncached <= config.local_prefill_threshold:
        return local("short_uncached_prompt",
                     f"{local_uncached} uncached tokens <= threshold {config.local_prefill_threshold}")
    ranked = rank_prefill_workers(request, workers, exclude_prefill)
    if not ranked:
        why = "all prefill workers failed" if exclude_prefill else "no available prefill worker"
        return local("no_prefill_worker", why)
    best = ranked[0]
    uncached = request.uncached_tokens(best)
    return RoutingDecision(
        "remote", decode.worker_id, best.worker_id, uncached, "long_uncached_prompt",
        f"{local_uncached} uncached tokens > threshold {config.local_prefill_threshold}; "
        f"prefill on {best.worker_id} ({uncached} uncached + {best.pending_prefill_tokens} pending tokens); "
        f"decode on {decode.worker_id}: {decode_why}",
        fallback_prefill_ids=tuple(w.worker_id for w in ranked[1:]))
