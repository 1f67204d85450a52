"""Exceptions raised by the cloud agent.

EdgeloopError (shared.errors)
 └── CloudAgentError           root of everything `cloud_agent` raises on purpose
      ├── BackupError          a backup cannot be taken where or of what was asked
      ├── KnowledgeError       a knowledge file is missing, unreadable or empty
      ├── StoreError           the store failed
      │    └── StoreUnavailable    the database is down or locked (retryable)
      ├── EnrollmentRefused    bad, used or expired token; key already enrolled
      ├── BackendError         an LLM backend failed (`retryable` tells)
      │    ├── BackendTimeout
      │    ├── BackendUnavailable  unreachable, or a 5xx answer
      │    └── BackendResponseError  an answer that is not a valid completion
      └── Overloaded           the scheduler cannot meet a request's deadline
"""

from __future__ import annotations

from shared.errors import EdgeloopError

__all__ = ["CloudAgentError"]


class CloudAgentError(EdgeloopError):
    """Root of the cloud agent's exceptions."""


class BackupError(CloudAgentError):
    """A backup cannot be taken: its destination is not empty, or there is nothing to copy."""


class KnowledgeError(CloudAgentError):
    """A knowledge file is missing, unreadable or holds no facts."""


class StoreError(CloudAgentError):
    """The store failed for a reason other than availability."""


class StoreUnavailable(StoreError):
    """The database is down, unreachable or locked; the operation may succeed later."""


class EnrollmentRefused(CloudAgentError):
    """An enrollment token is unknown, used or expired, or the key is already enrolled."""


class BackendError(CloudAgentError):
    """An LLM backend failed. `retryable` says whether another try (or backend) may work."""

    retryable = True


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached, or answered with a server error."""


class BackendResponseError(BackendError):
    """The backend answered with something that is not a valid completion."""

    retryable = False


class Overloaded(CloudAgentError):
    """The scheduler cannot start the request before its deadline; answer it elsewhere."""
