"""``/metrics``: the server's Prometheus metrics (``prometheus-client``), named as vLLM names
its own where one exists (``vllm:`` becomes ``cpmlive_``)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a cached token on a small model) to minutes (a long answer on a 10B model).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)


class ServerMetrics:
    """One registry per app (several apps in one process, as in the tests, never share counts)."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        def stat(key: str) -> Callable[[], float]:
            return lambda: float(engine_stats().get(key, 0))

        for name, key, text in (("cpmlive_num_requests_running", "running", "requests in the running batch"),
                                ("cpmlive_num_requests_waiting", "waiting", "requests waiting to join it"),
                                ("cpmlive_kv_cache_used_bytes", "kv_bytes_used",
                                 "KV cache bytes the running requests hold"),
                                ("cpmlive_kv_cache_reserved_bytes", "kv_bytes_reserved", "KV cache bytes allocated"),
                                ("cpmlive_spec_decode_num_draft_tokens", "drafted_tokens",
                                 "tokens drafted for speculative decoding (an assistant model or prompt lookup)"),
                                ("cpmlive_spec_decode_num_accepted_tokens", "kept_tokens",
                                 "drafted tokens the model kept")):
            Gauge(name, text, registry=registry).set_function(stat(key))

        def acceptance() -> float:
            stats = engine_stats()
            return stats.get("kept_tokens", 0) / max(stats.get("drafted_tokens", 0), 1)

        Gauge("cpmlive_spec_decode_draft_acceptance_rate", "kept / drafted tokens since the start",
              registry=registry).set_function(acceptance)

        def hit_rate() -> float:
            stats = engine_stats()
            return stats.get("prefix_hit_tokens", 0) / max(stats.get("prefix_queried_tokens", 0), 1)

        for name, key, text in (("cpmlive_prefix_cache_queries_tokens", "prefix_queried_tokens",
                                 "prompt tokens looked up in the prefix cache"),
                                ("cpmlive_prefix_cache_hits_tokens", "prefix_hit_tokens",
                                 "prompt tokens whose keys and values came from the prefix cache"),
                                ("cpmlive_prefix_cache_bytes", "prefix_cache_bytes", "bytes the prefix cache holds")):
            Gauge(name, text, registry=registry).set_function(stat(key))
        Gauge("cpmlive_prefix_cache_hit_rate", "prompt tokens reused / looked up since the start",
              registry=registry).set_function(hit_rate)
        self.http_requests = Counter("cpmlive_http_requests", "HTTP requests answered", ["route", "status"],
                                     registry=registry)
        self.rejected = Counter("cpmlive_requests_rejected", "requests refused because the queue was full",
                                registry=registry)
        self.prompt_tokens = Counter("cpmlive_prompt_tokens", "prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter("cpmlive_generation_tokens", "tokens generated", registry=registry)
        self.finished = Counter("cpmlive_request_success", "generations finished, by reason", ["finished_reason"],
                                registry=registry)
        self.ttft = Histogram("cpmlive_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.tpot = Histogram("cpmlive_time_per_output_token_seconds", "time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("cpmlive_e2e_request_latency_seconds", "time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, handle: object) -> None:
        """Record one finished engine request (an ``infer.engine.Handle``)."""
        self.prompt_tokens.inc(handle.prompt_tokens)
        self.generation_tokens.inc(handle.completion_tokens)
        self.finished.labels(handle.finish_reason or "unknown").inc()
        if handle.first_token_at is not None:
            self.ttft.observe(handle.first_token_at - handle.submitted_at)
            if handle.finished_at is not None and handle.completion_tokens > 1:
                self.tpot.observe((handle.finished_at - handle.first_token_at) / (handle.completion_tokens - 1))
        if handle.finished_at is not None:
            self.latency.observe(handle.finished_at - handle.submitted_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
