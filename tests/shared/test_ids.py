from __future__ import annotations

from protocol.messages import MESSAGE_TYPES
from shared import new_device_id, new_idempotency_key, new_request_id, new_session_id


def test_new_ids_are_unique_and_prefixed_by_kind() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("req_") for i in ids)
    assert new_device_id().startswith("dev_") and new_session_id().startswith("ses_")
    assert new_idempotency_key().startswith("idk_")


def test_new_ids_fit_the_protocol_identifier_pattern() -> None:
    pattern = MESSAGE_TYPES["cancel"].model_json_schema()["properties"]["request_id"]["pattern"]
    import re

    for make in (new_device_id, new_request_id, new_session_id, new_idempotency_key):
        assert re.fullmatch(pattern.strip("^$"), make())
