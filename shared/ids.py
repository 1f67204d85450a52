"""Identifier types.

Ids travel as short strings; `NewType`s keep a `DeviceId` from being passed where a `RequestId`
is expected. New ids are random (128 bits), prefixed by kind so logs read well.
"""

from __future__ import annotations

import secrets
from typing import NewType

__all__ = [
    "AdapterVersion",
    "DeviceId",
    "IdempotencyKey",
    "RequestId",
    "SessionId",
    "new_device_id",
    "new_idempotency_key",
    "new_request_id",
    "new_session_id",
]

DeviceId = NewType("DeviceId", str)
RequestId = NewType("RequestId", str)
SessionId = NewType("SessionId", str)
IdempotencyKey = NewType("IdempotencyKey", str)
AdapterVersion = NewType("AdapterVersion", int)


def _token() -> str:
    return secrets.token_hex(16)


def new_device_id() -> DeviceId:
    return DeviceId(f"dev_{_token()}")


def new_request_id() -> RequestId:
    return RequestId(f"req_{_token()}")


def new_session_id() -> SessionId:
    return SessionId(f"ses_{_token()}")


def new_idempotency_key() -> IdempotencyKey:
    return IdempotencyKey(f"idk_{_token()}")
