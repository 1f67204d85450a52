"""The cloud's store: SQLAlchemy 2 (async) over SQLite (WAL) or PostgreSQL, with Alembic.

`Store` is the one interface the rest of the cloud agent uses; the same test suite runs it
against SQLite and PostgreSQL.
"""

from cloud_agent.store.records import (
    INTERACTION_STATUSES,
    MAX_INTERACTIONS_PAGE,
    DeviceRecord,
    FeedbackSummary,
    InteractionRecord,
    NewFeedback,
    NewInteraction,
    NewReport,
    NewUpdateStatus,
    RouteCounts,
    RoutingSummary,
    SessionEvent,
)
from cloud_agent.store.rollouts import AdapterRecord, Offers, RolloutHealth
from cloud_agent.store.store import (
    FORGOTTEN,
    MAX_ROUTING_HOURS,
    MAX_TOKEN_NOTE,
    REVOCATIONS,
    Store,
)

__all__ = [
    "FORGOTTEN",
    "INTERACTION_STATUSES",
    "MAX_INTERACTIONS_PAGE",
    "MAX_ROUTING_HOURS",
    "MAX_TOKEN_NOTE",
    "REVOCATIONS",
    "AdapterRecord",
    "DeviceRecord",
    "FeedbackSummary",
    "InteractionRecord",
    "NewFeedback",
    "NewInteraction",
    "NewReport",
    "NewUpdateStatus",
    "Offers",
    "RolloutHealth",
    "RouteCounts",
    "RoutingSummary",
    "SessionEvent",
    "Store",
]
