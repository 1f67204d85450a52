"""Small helpers both sides of edgeloop need: ids, Ed25519 keys, configuration, logging.

This package imports nothing else of ours, so `protocol`, `edge_agent` and `cloud_agent` can
all depend on it without cycles.
"""

from shared.config import load_config
from shared.errors import ConfigError, EdgeloopError, KeyFileError, SignatureError
from shared.ids import (
    AdapterVersion,
    DeviceId,
    IdempotencyKey,
    RequestId,
    SessionId,
    new_device_id,
    new_idempotency_key,
    new_request_id,
    new_session_id,
)
from shared.keys import (
    SigningKey,
    VerifyKey,
    b64url_decode,
    b64url_encode,
)
from shared.log import configure_logging

__all__ = [
    "AdapterVersion",
    "ConfigError",
    "DeviceId",
    "EdgeloopError",
    "IdempotencyKey",
    "KeyFileError",
    "RequestId",
    "SessionId",
    "SignatureError",
    "SigningKey",
    "VerifyKey",
    "b64url_decode",
    "b64url_encode",
    "configure_logging",
    "load_config",
    "new_device_id",
    "new_idempotency_key",
    "new_request_id",
    "new_session_id",
]
