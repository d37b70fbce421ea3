"""Router metrics (Prometheus, ``baton:`` prefix, vLLM's names where one exists).

One ``RouterMetrics`` per router, on its own ``CollectorRegistry`` (several
routers can live in one process, e.g. tests). What the router measures itself:

- request level: ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
  ``e2e_request_latency_seconds``, ``request_queue_time_seconds`` (router
  queue), ``num_requests_running`` / ``num_requests_waiting``, prompt /
  generation / cached token counters, ``request_success_total{finished_reason}``,
  ``request_errors_total{code}``.
- TTFT breakdown: ``ttft_phase_seconds{phase}`` with phase ``router_queue``,
  ``routing`` (hash + index + policy), ``prefill`` (the Prefill rpc, as the
  router sees it), ``decode_first_token`` (Decode rpc to its first chunk: KV
  transfer + decode admission as the router sees them) and, on the local path,
  ``local_first_token`` (Generate rpc to its first chunk). When a worker reports its
  own parts (``metrics`` on the handle or chunk: ``prefill_queue``,
  ``prefill_compute``, ``kv_transfer``, ``decode_admission``, in seconds) they
  are recorded under the same histogram with that phase name.
- routing: ``disagg_decision_total{decision,reason}``, ``routed_requests_total{worker,role}``,
  ``prefill_retries_total``, ``decode_retries_total``, index hit/query tokens, and — read at scrape time —
  ``prefix_index_degraded``, ``prefix_index_errors_total``, ``workers{role,state}``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "baton:"
_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
WORKER_PHASES = ("prefill_queue", "prefill_compute", "kv_transfer", "decode_admission")


class _StateCollector:
    """Values read at scrape time from the live objects (index, directory)."""

    def __init__(self, index_state: Callable[[], tuple[bool, int]] | None,
                 worker_states: Callable[[], list[tuple[str, str]]] | None):
        self.index_state = index_state
        self.worker_states = worker_states

    def collect(self):
        if self.index_state is not None:
            degraded, errors = self.index_state()
            g = GaugeMetricFamily(P + "prefix_index_degraded",
                                  "1 while the prefix index is unreachable (routing by load alone)")
            g.add_metric([], 1.0 if degraded else 0.0)
            yield g
            c = CounterMetricFamily(P + "prefix_index_errors", "Prefix index lookups that failed")
            c.add_metric([], errors)
            yield c
        if self.worker_states is not None:
            counts: dict[tuple[str, str], int] = {}
            for role, state in self.worker_states():
                counts[(role, state)] = counts.get((role, state), 0) + 1
            g = GaugeMetricFamily(P + "workers", "Workers known to the router", labels=["role", "state"])
            for (role, state), n in sorted(counts.items()):
                g.add_metric([role, state], n)
            yield g


class RouterMetrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        self.model = model
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token (router arrival to first token)",
                              m, buckets=_LATENCY, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive output tokens",
                             m, buckets=_ITL, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Router arrival to last token",
                             m, buckets=_E2E, registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Time waiting in the router queue",
                                    m, buckets=_LATENCY, registry=r)
        self.ttft_phase = Histogram(P + "ttft_phase_seconds", "Time to first token, by phase",
                                    m + ["phase"], buckets=_LATENCY, registry=r)
        self.running = Gauge(P + "num_requests_running", "Samples in flight on workers from this router",
                             m, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting in the router queue", m, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", m, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", m, registry=r)
        self.cached_tokens = Counter(P + "prompt_tokens_cached", "Prompt tokens the workers served from cache",
                                     m, registry=r)
        self.success = Counter(P + "request_success", "Finished samples", m + ["finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "Requests that ended with an error", m + ["code"], registry=r)
        self.decisions = Counter(P + "disagg_decision", "Local vs remote prefill decisions",
                                 m + ["decision", "reason"], registry=r)
        self.routed = Counter(P + "routed_requests", "Samples sent to a worker", m + ["worker", "role"], registry=r)
        self.prefill_retries = Counter(P + "prefill_retries", "Prefills retried on another worker", m, registry=r)
        self.decode_retries = Counter(P + "decode_retries",
                                      "Decode/generate streams re-run on another decode worker after failing "
                                      "before their first token", m, registry=r)
        self.index_query_tokens = Counter(P + "router_index_queries_tokens",
                                          "Prompt tokens looked up in the prefix index", m, registry=r)
        self.index_hit_tokens = Counter(P + "router_index_hits_tokens",
                                        "Prompt tokens the chosen worker held per the index", m, registry=r)

    def attach_state(self, index_state=None, worker_states=None) -> None:
        self.registry.register(_StateCollector(index_state, worker_states))

    def phase(self, name: str, seconds: float) -> None:
        if seconds >= 0:
            self.ttft_phase.labels(self.model, name).observe(seconds)

    def worker_phases(self, reported: dict | None) -> None:
        """Record the TTFT parts a worker reported (unknown keys ignored)."""
        for name in WORKER_PHASES:
            value = (reported or {}).get(name)
            if isinstance(value, (int, float)):
                self.phase(name, float(value))

    def render(self) -> bytes:
        return generate_latest(self.registry)
