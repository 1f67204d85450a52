"""Pin the public API of each package: a change here is a change users see."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import cloud_agent
import edge_agent
import protocol
import shared

PINNED = {
    "shared": {
        "AdapterVersion", "ConfigError", "DeviceId", "EdgeloopError", "IdempotencyKey",
        "KeyFileError", "RequestId", "SessionId", "SignatureError", "SigningKey", "VerifyKey",
        "b64url_decode", "b64url_encode", "configure_logging", "load_config", "new_device_id",
        "new_idempotency_key", "new_request_id", "new_session_id",
    },
    "edge_agent": {
        "DEFAULT_POLICY", "Adapter", "AdapterError", "ApplyResult", "BundleDownload",
        "UpdateManager", "UpdateRejected", "Updater", "verify_offer", "BlockingConversation",
        "BlockingEdgeAgent", "BlockingReplyStream", "Conversation", "EdgeAgent",
        "Reply", "ReplyStream", "Turn", "CloudLink", "CloudUnavailable", "LinkState",
        "DeviceProfile", "EdgeAgentError",
        "Generation", "LocalModel", "LocalModelError", "Outbox", "OutboxEntry", "OutboxError",
        "PlaceholderMap", "Policy", "Redaction", "Redactor", "RuntimeSettings", "StreamRestorer",
        "choose_settings", "Coverage", "IntentIndex", "RouteDecision", "Router", "Target",
        "calibrate", "difficulty", "SMALL_TALK", "SMALL_TALK_REPLIES",
    },
    "cloud_agent": set(),
}  # fmt: skip


@pytest.mark.parametrize("module", [shared, edge_agent, cloud_agent], ids=lambda m: m.__name__)
def test_exported_members_are_pinned(module: object) -> None:
    assert set(module.__all__) == PINNED[module.__name__]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["shared", "protocol", "edge_agent", "cloud_agent"])
def test_every_exported_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    for member in module.__all__:
        assert hasattr(module, member), f"{name}.{member}"


def test_protocol_exports_every_message_and_the_session_machines() -> None:
    from protocol.messages import MESSAGE_TYPES

    exported = set(protocol.__all__)
    assert {cls.__name__ for cls in MESSAGE_TYPES.values()} <= exported
    assert {"ClientSession", "ServerSession", "decode", "encode", "MESSAGE_ADAPTER"} <= exported
    assert len(exported) == len(protocol.__all__)


def test_every_package_error_root_derives_from_the_shared_root() -> None:
    from cloud_agent.errors import CloudAgentError
    from edge_agent.errors import EdgeAgentError
    from protocol.errors import ProtocolError

    for root in (CloudAgentError, EdgeAgentError, ProtocolError):
        assert issubclass(root, shared.EdgeloopError)


def test_protocol_imports_no_io_libraries() -> None:
    # In a fresh interpreter: this test process has asyncio loaded already.
    code = "import sys, protocol; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in out.stdout.split()}
    assert "protocol" in loaded
    assert not loaded & {"asyncio", "websockets", "httpx", "edge_agent", "cloud_agent"}
