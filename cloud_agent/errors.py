"""Exceptions raised by the cloud agent.

    EdgeloopError (shared.errors)
     └── CloudAgentError           root of everything `cloud_agent` raises on purpose

Subclasses land with the parts that raise them (backends, store, scheduler, rollout).
"""

from __future__ import annotations

from shared.errors import EdgeloopError

__all__ = ["CloudAgentError"]


class CloudAgentError(EdgeloopError):
    """Root of the cloud agent's exceptions."""


class KnowledgeError(CloudAgentError):
    """A knowledge file is missing, unreadable or holds no facts."""


class StoreError(CloudAgentError):
    """The store failed for a reason other than availability."""


class StoreUnavailable(StoreError):
    """The database is down, unreachable or locked; the operation may succeed later."""


class EnrollmentRefused(CloudAgentError):
    """An enrollment token is unknown, used or expired, or the key is already enrolled."""
