"""Prometheus metrics, named after vLLM's under the `nanoseek:` prefix, labelled by `model_name`.

Latencies are measured in the server, per request: time to first token (from the request's arrival),
inter-token latency (between the events of one completion; an event carries one token, or several
under speculative decoding) and end-to-end latency. Request outcomes are counted once per request
(`stop`, `length`, `content_filter`, `cancelled` for a client that went away, `error`, and, before any
generation, `invalid` for a 400 and `rejected` for a 503). Engine gauges and counters (running and
waiting sequences, cache usage, tokens, preemptions, speculative-decoding acceptance) are read from
each loaded engine when /metrics is scraped, so they are never stale.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nanoseek.serve.registry import Deployment

PREFIX = "nanoseek:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}requests", "Requests by outcome.", ["model_name", "outcome"],
                                registry=self.registry)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Seconds from a request's arrival to its first token.",
            ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Seconds between consecutive outputs of a completion.",
            ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Seconds from a request's arrival to its end.",
            ["model_name"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self._engines = _EngineCollector()
        self.registry.register(self._engines)
        self._lock = threading.Lock()

    def render(self, deployments: Sequence[Deployment]) -> bytes:
        """The exposition text; engine statistics are read from `deployments` (blocks up to one engine step)."""
        with self._lock:
            self._engines.deployments = deployments
            return generate_latest(self.registry)


class _EngineCollector:
    """Engine statistics of every loaded model, read at scrape time."""

    deployments: Sequence[Deployment] = ()

    def describe(self) -> list[Metric]:
        return []  # dynamic: nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        def gauge(name, documentation):
            return GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name"])

        def counter(name, documentation):
            return CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])

        running = gauge("num_requests_running", "Sequences being generated (a request with n=4 counts 4).")
        waiting = gauge("num_requests_waiting", "Sequences waiting for a slot in the engine.")
        in_flight = gauge("num_requests_in_flight", "Sequences admitted by the server (running, waiting, queued).")
        cache = gauge("kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (0-1).")
        acceptance = gauge("spec_decode_acceptance_rate", "Accepted / proposed speculative draft tokens.")
        prompt = counter("prompt_tokens", "Prompt tokens prefilled (recomputation after preemption included).")
        generation = counter("generation_tokens", "Tokens generated.")
        preemptions = counter("num_preemptions", "Sequences preempted for lack of cache blocks.")
        prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again).")
        drafts = counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed.")
        accepted = counter("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.")
        for deployment in self.deployments:
            stats, label = deployment.engine.stats, [deployment.name]
            running.add_metric(label, stats.num_running)
            waiting.add_metric(label, stats.num_waiting)
            in_flight.add_metric(label, deployment.in_flight)
            cache.add_metric(label, stats.kv_cache_usage)
            acceptance.add_metric(label, stats.acceptance_rate)
            prompt.add_metric(label, stats.prompt_tokens)
            generation.add_metric(label, stats.generation_tokens)
            preemptions.add_metric(label, stats.preemptions)
            prefix_queries.add_metric(label, stats.prefix_cache_queries)
            prefix_hits.add_metric(label, stats.prefix_cache_hits)
            drafts.add_metric(label, stats.spec_draft_tokens)
            accepted.add_metric(label, stats.spec_accepted_tokens)
        return [running, waiting, in_flight, cache, acceptance, prompt, generation, preemptions, prefix_queries,
                prefix_hits, drafts, accepted]
