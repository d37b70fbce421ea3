"""Per-worker Prometheus metrics (design.md §6), in the worker's own registry.

Exposed two ways: an HTTP ``/metrics`` endpoint when the worker is started with
``metrics_port`` (0 = any free port; the port is in ``Stats``), and
``WorkerHost.metrics_text()`` (in process / through Ray). Every series carries
``worker`` and ``role`` labels; names use the ``baton:`` prefix and vLLM's
suffixes.

Time-to-first-token pieces, so a dashboard can split a disaggregated TTFT:
- ``request_queue_time_seconds``: arrival → first scheduled (prefill queue);
- ``prefill_compute_seconds``: first scheduled → first token;
- ``kv_transfer_seconds`` / ``kv_transfer_bytes`` (+ ``kv_transfer_gbps``): the pull;
- ``decode_admission_seconds``: Decode rpc arrival → request running on the
  decode worker (allocation + pull + import);
- ``time_to_first_token_seconds``: as this worker sees it (Prefill: arrival →
  first token; Generate: arrival → first token streamed).
Engine gauges/counters (running, waiting, held, KV usage, prefix cache queries
and hits, preemptions) are read from the engine loop's latest stats snapshot
at scrape time.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GBPS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 200, 400)


class _EngineCollector:
    def __init__(self, stats_fn: Callable, labels: dict[str, str]):
        self.stats_fn = stats_fn
        self.labels = labels

    def collect(self):
        s = self.stats_fn()
        if s is None:
            return
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"baton:{name}", doc, labels=names)
            g.add_metric(values, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(f"baton:{name}", doc, labels=names)
            c.add_metric(values, v)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting (queue + waiting for KV).", s.num_waiting)
        yield gauge("num_requests_held", "Prefill: requests holding KV for a decode worker.", s.num_held)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use, in [0, 1].", s.kv_cache_usage)
        yield gauge("num_free_kv_blocks", "Free KV blocks (cached-evictable included).", s.num_free_blocks)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted (recompute).", s.num_preemptions)


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str, stats_fn: Callable):
        self.registry = CollectorRegistry()
        self.labels = {"worker": worker_id, "role": role}
        names = list(self.labels)
        r = self.registry

        def hist(name, doc, buckets=_LATENCY):
            return Histogram(f"baton:{name}", doc, names, registry=r, buckets=buckets).labels(**self.labels)

        def counter(name, doc):
            return Counter(f"baton:{name}", doc, names, registry=r).labels(**self.labels)

        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduled.")
        self.prefill_compute = hist("prefill_compute_seconds", "First scheduled to first token.")
        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token, as this worker sees it.")
        self.itl = hist("inter_token_latency_seconds", "Time between streamed chunks of a completion.")
        self.e2e = hist("e2e_request_latency_seconds", "Rpc arrival to the last token of a stream.")
        self.decode_admission = hist("decode_admission_seconds",
                                     "Decode rpc arrival to the request running (pull and import included).")
        self.kv_seconds = hist("kv_transfer_seconds", "Duration of one KV transfer.")
        self.kv_gbps = hist("kv_transfer_gbps", "Throughput of one KV transfer, GB/s.", _GBPS)
        self.kv_bytes = counter("kv_transfer_bytes", "KV bytes moved (received on decode, sent on prefill).")
        self.kv_transfers = counter("kv_transfers", "KV transfers that completed.")
        self.kv_failures = counter("kv_transfer_failures", "KV transfers that failed.")
        self.kv_fallbacks = Counter("baton:kv_transfer_fallbacks", "KV pulls that used another transport "
                                    "than the handle's (nccl without an NCCL path → grpc), by reason.",
                                    names + ["reason"], registry=r)
        self.expired_holds = counter("expired_holds", "Holds freed by the TTL.")
        self.requests = Counter("baton:worker_requests", "Requests by rpc and outcome.",
                                names + ["rpc", "outcome"], registry=r)
        self.registry.register(_EngineCollector(stats_fn, self.labels))
        # running totals for Stats (Prometheus counters are write-only by design)
        self.kv_total = {"transfers": 0, "bytes": 0, "seconds": 0.0, "failures": 0, "expired": 0}

    def transfer(self, stats, ok: bool) -> None:
        if getattr(stats, "fallback_reason", ""):
            self.kv_fallbacks.labels(**self.labels, reason=stats.fallback_reason).inc()
        if not ok:
            self.kv_failures.inc()
            self.kv_total["failures"] += 1
            return
        self.kv_transfers.inc()
        self.kv_bytes.inc(stats.num_bytes)
        self.kv_seconds.observe(stats.seconds)
        if stats.num_bytes:
            self.kv_gbps.observe(stats.gbps)
        self.kv_total["transfers"] += 1
        self.kv_total["bytes"] += stats.num_bytes
        self.kv_total["seconds"] += stats.seconds

    def expired(self, n: int) -> None:
        self.expired_holds.inc(n)
        self.kv_total["expired"] += n

    def request(self, rpc: str, outcome: str) -> None:
        self.requests.labels(**self.labels, rpc=rpc, outcome=outcome).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Start /metrics on ``port`` (0 = free port); returns (server, bound_port)."""
        from prometheus_client import start_http_server
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_port
