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
