"""Prometheus metrics of the cloud agent (`prometheus-client`), one registry per service so
several services (tests, replicas in one process) do not collide."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.requests = Counter(
            "edgeloop_requests_total",
            "Escalations by how they ended",
            ["priority", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "edgeloop_request_seconds",
            "Escalation latency inside the server",
            ["priority"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.tokens = Counter(
            "edgeloop_tokens_total", "Tokens spent by the cloud", ["kind"], registry=r
        )
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
        # Labelled children looked up once: `labels()` costs a lock and a dict build per call,
        # and these are touched on every escalation.
        self.prompt_tokens = self.tokens.labels("prompt")
        self.completion_tokens = self.tokens.labels("completion")
        self._finished: dict[tuple[str, str], tuple[Any, Any]] = {}

    def finished(self, priority: str, outcome: str, seconds: float) -> None:
        """Count one escalation by how it ended and observe its latency."""
        children = self._finished.get((priority, outcome))
        if children is None:
            children = self._finished[(priority, outcome)] = (
                self.requests.labels(priority, outcome),
                self.latency.labels(priority),
            )
        children[0].inc()
        children[1].observe(seconds)
