"""Prometheus metrics of the cloud agent (`prometheus-client`), one registry per service so
several services (tests, replicas in one process) do not collide."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("edgeloop_sessions", "Authenticated sessions open", registry=r)
        self.connections = Counter(
            "edgeloop_connections_total", "WebSocket connections accepted", registry=r
        )
        self.auth_failures = Counter(
            "edgeloop_auth_failures_total", "Refused authentications", ["reason"], registry=r
        )
        self.enrollments = Counter("edgeloop_enrollments_total", "Devices enrolled", registry=r)
        self.escalations = EscalationCounts()
        r.register(self.escalations)
        self.store_batch = Histogram(
            "edgeloop_store_batch_items",
            "Items sharing one store query or commit (devices looked up, feedback stored, ...)",
            ["kind"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
            registry=r,
        )
        self.log_records = Counter(
            "edgeloop_interaction_log_records",
            "Interactions and session events the log writer handled, by outcome (written, lost)",
            ["outcome"],
            registry=r,
        )
        self.log_pending = Gauge(
            "edgeloop_interaction_log_pending", "Records waiting to be written", registry=r
        )
        self.grounded = Counter(
            "edgeloop_grounded_answers_total", "Answers quoted from a knowledge fact", registry=r
        )
        self.learned = Counter(
            "edgeloop_knowledge_learned_total",
            "Questions attached to a knowledge fact from feedback",
            registry=r,
        )
        self.knowledge_facts = Gauge(
            "edgeloop_knowledge_facts", "Facts in the knowledge index", registry=r
        )
        self.knowledge_reloads = Counter(
            "edgeloop_knowledge_reloads_total",
            "Reloads of the knowledge file, by outcome (ok, refused)",
            ["outcome"],
            registry=r,
        )
        self.purged = Counter(
            "edgeloop_purged_rows_total",
            "Rows deleted by the retention policy, by table",
            ["table"],
            registry=r,
        )
        self.privacy_violations = Counter(
            "edgeloop_privacy_violations_total",
            "Escalations that carried raw personal data, by kind",
            ["kind"],
            registry=r,
        )
        self.protocol_violations = Counter(
            "edgeloop_protocol_violations_total", "Invalid frames by error", ["error"], registry=r
        )
        self.acks = Counter(
            "edgeloop_acks_total", "Acknowledged messages", ["type", "duplicate"], registry=r
        )
        self.device_requests = Counter(
            "edgeloop_device_requests_total",
            "Requests devices answered, by route (local, cloud, local_only, local_fallback), "
            "from their reports",
            ["route"],
            registry=r,
        )
        self.update_offers = Counter(
            "edgeloop_update_offers_total", "Update offers sent to devices", registry=r
        )
        self.bundle_bytes = Counter(
            "edgeloop_bundle_bytes_total", "Bundle bytes served over fetch", registry=r
        )
        self.in_flight = Gauge(
            "edgeloop_scheduler_in_flight", "Backend slots in use", ["lane"], registry=r
        )
        self.queued = Gauge(
            "edgeloop_scheduler_queued", "Work waiting for a slot", ["lane"], registry=r
        )
        self.service_seconds = Gauge(
            "edgeloop_scheduler_service_seconds", "Mean time a slot is held (EWMA)", registry=r
        )
        self.wait_seconds = Gauge(
            "edgeloop_scheduler_online_wait_seconds", "Mean online queue wait (EWMA)", registry=r
        )
        self.cluster_listening = Gauge(
            "edgeloop_cluster_listening",
            "1 while this replica hears the others' notices (PostgreSQL LISTEN), else 0",
            registry=r,
        )
        self.cluster_notices = Counter(
            "edgeloop_cluster_notices_total",
            "Notices heard from the replicas (this one's included), by channel",
            ["channel"],
            registry=r,
        )


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Upper bounds (seconds) of `edgeloop_request_seconds`."""


class EscalationCounts:
    """How escalations ended, how long they took and the tokens they spent, counted in plain
    numbers and handed to Prometheus when it scrapes (a custom collector).

    These are touched by every escalation: through prometheus-client's own metrics, each a
    lock and a few calls per touch, the five touches of one escalation were a thirtieth of the
    server's work per request in `bench.cloud_roundtrip`. The event loop is the only writer;
    a scrape reads a snapshot of small dicts.

    Exports ``edgeloop_requests_total{priority,outcome}``, the histogram
    ``edgeloop_request_seconds{priority}`` and ``edgeloop_tokens_total{kind}``.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self._labels: list[str] = [
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in (*buckets, float("inf"))
        ]
        """The buckets' ``le`` labels, +Inf last."""
        self.ended: dict[tuple[str, str], int] = {}
        """Escalations by (priority, outcome)."""
        self._latency: dict[str, list[float]] = {}
        """Per priority: the count in each bucket (not cumulative, +Inf last), then the sum."""
        self.tokens = {"prompt": 0, "completion": 0}

    def finished(self, priority: str, outcome: str, seconds: float) -> None:
        """One escalation ended with `outcome` after `seconds`."""
        key = (priority, outcome)
        self.ended[key] = self.ended.get(key, 0) + 1
        counts = self._latency.get(priority)
        if counts is None:
            counts = self._latency[priority] = [0.0] * (len(self.buckets) + 2)
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        counts[-1] += seconds

    def refused(self, priority: str, outcome: str) -> None:
        """One escalation refused before it ran (no latency to observe)."""
        key = (priority, outcome)
        self.ended[key] = self.ended.get(key, 0) + 1

    def spent(self, prompt_tokens: int, completion_tokens: int) -> None:
        tokens = self.tokens
        tokens["prompt"] += prompt_tokens
        tokens["completion"] += completion_tokens

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        requests, latency, tokens = self._families()
        for (priority, outcome), n in list(self.ended.items()):
            requests.add_metric([priority, outcome], n)
        for priority, counts in list(self._latency.items()):
            counts = list(counts)
            cumulative, buckets = 0.0, []
            for label, count in zip(self._labels, counts, strict=False):
                cumulative += count
                buckets.append((label, cumulative))
            latency.add_metric([priority], buckets, counts[-1])
        for kind, spent in list(self.tokens.items()):
            tokens.add_metric([kind], spent)
        yield from (requests, latency, tokens)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "edgeloop_requests", "Escalations by how they ended", labels=["priority", "outcome"]
            ),
            HistogramMetricFamily(
                "edgeloop_request_seconds",
                "Escalation latency inside the server",
                labels=["priority"],
            ),
            CounterMetricFamily("edgeloop_tokens", "Tokens spent by the cloud", labels=["kind"]),
        )
