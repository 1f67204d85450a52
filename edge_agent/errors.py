"""Exceptions raised by the edge SDK.

    EdgeloopError (shared.errors)
     └── EdgeAgentError            root of everything `edge_agent` raises on purpose

Subclasses land with the parts that raise them (local model, link, privacy, updates).
"""

from __future__ import annotations

from shared.errors import EdgeloopError

__all__ = ["EdgeAgentError"]


class EdgeAgentError(EdgeloopError):
    """Root of the edge SDK's exceptions."""
