"""The edgeloop device SDK.

Built so far: the cloud link (enroll once, authenticate, reconnect with backoff, typed
unavailability, outbox delivery), the router (intents, privacy, coverage, difficulty cues,
link state, calibration), the local model (llama.cpp, device profiles, confidence, LoRA
hot-swap), privacy (detect, redact to typed placeholders, restore, per-kind policy) and the
durable outbox. `EdgeAgent`, which composes them, is open work (see the project's issues).
"""

from edge_agent.errors import EdgeAgentError
from edge_agent.link import CloudLink, CloudUnavailable, LinkState
from edge_agent.local_model import (
    Adapter,
    AdapterError,
    DeviceProfile,
    Generation,
    LocalModel,
    LocalModelError,
    RuntimeSettings,
    choose_settings,
)
from edge_agent.outbox import Outbox, OutboxEntry, OutboxError
from edge_agent.privacy import (
    DEFAULT_POLICY,
    PlaceholderMap,
    Policy,
    Redaction,
    Redactor,
    StreamRestorer,
)
from edge_agent.router import (
    Coverage,
    IntentIndex,
    RouteDecision,
    Router,
    Target,
    calibrate,
    difficulty,
)

__all__ = [
    "DEFAULT_POLICY",
    "Adapter",
    "AdapterError",
    "CloudLink",
    "CloudUnavailable",
    "LinkState",
    "DeviceProfile",
    "EdgeAgentError",
    "Generation",
    "LocalModel",
    "LocalModelError",
    "RuntimeSettings",
    "choose_settings",
    "Coverage",
    "IntentIndex",
    "RouteDecision",
    "Router",
    "Target",
    "calibrate",
    "difficulty",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "PlaceholderMap",
    "Policy",
    "Redaction",
    "Redactor",
    "StreamRestorer",
]
