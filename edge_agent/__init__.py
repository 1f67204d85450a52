"""The edgeloop device SDK.

`EdgeAgent` answers locally what it can (app intents, the local model), escalates the rest with
personal data replaced by placeholders, and answers on the device when the cloud cannot. Its
parts are usable alone: `Router`, `LocalModel`, `Redactor`, `CloudLink`, `Outbox`.
"""

from edge_agent.agent import Conversation, EdgeAgent, Reply, ReplyStream, Turn
from edge_agent.apply import ApplyResult, UpdateManager
from edge_agent.blocking import BlockingConversation, BlockingEdgeAgent, BlockingReplyStream
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
    SMALL_TALK,
    SMALL_TALK_REPLIES,
    Coverage,
    IntentIndex,
    RouteDecision,
    Router,
    Target,
    calibrate,
    difficulty,
)
from edge_agent.updater import Updater
from edge_agent.updates import BundleDownload, UpdateRejected, verify_offer

__all__ = [
    "DEFAULT_POLICY",
    "Adapter",
    "AdapterError",
    "ApplyResult",
    "BundleDownload",
    "UpdateManager",
    "UpdateRejected",
    "Updater",
    "verify_offer",
    "BlockingConversation",
    "BlockingEdgeAgent",
    "BlockingReplyStream",
    "Conversation",
    "EdgeAgent",
    "Reply",
    "ReplyStream",
    "Turn",
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
    "SMALL_TALK",
    "SMALL_TALK_REPLIES",
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
