"""Prometheus metrics of `jaxinfer serve` (one registry per server, served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Queue depth, active slots, request counts by outcome, token counts, latencies."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("jaxinfer_queue_depth", "requests waiting for a slot", registry=r)
        self.active_slots = Gauge("jaxinfer_active_slots", "slots holding a request", registry=r)
        self.admitted = Counter("jaxinfer_requests_admitted", "requests accepted", registry=r)
        self.finished = Counter("jaxinfer_requests_finished", "requests completed", registry=r)
        self.cancelled = Counter("jaxinfer_requests_cancelled",
                                 "requests cancelled (client gone) or timed out", registry=r)
        self.rejected = Counter("jaxinfer_requests_rejected", "requests refused: queue full",
                                registry=r)
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "prompt tokens admitted",
                                     registry=r)
        self.generated_tokens = Counter("jaxinfer_generated_tokens", "tokens generated",
                                        registry=r)
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds",
                              "from arrival to the first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram("jaxinfer_inter_token_latency_seconds",
                             "between tokens of one stream", buckets=_LATENCY, registry=r)
        self.prefix_hits = Counter("jaxinfer_prefix_cache_hits",
                                   "requests started from a cached prompt prefix", registry=r)
        self.prefix_misses = Counter("jaxinfer_prefix_cache_misses",
                                     "requests that found no cached prefix", registry=r)
