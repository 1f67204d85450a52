"""Every message type round-trips, and every type refuses bad input with a typed error."""

from __future__ import annotations

import json

import pytest

from protocol import (
    MESSAGE_ADAPTER,
    DecodeError,
    ErrorCode,
    FrameTooLarge,
    InvalidMessage,
    MalformedFrame,
    UnknownMessageType,
    decode,
    encode,
)
from protocol.examples import EXAMPLES as SAMPLES
from protocol.messages import MESSAGE_TYPES

ALL_TYPES = sorted(MESSAGE_TYPES)


def test_samples_cover_every_message_type() -> None:
    assert sorted(SAMPLES) == ALL_TYPES


@pytest.mark.parametrize("tag", ALL_TYPES)
def test_message_round_trips_through_a_frame(tag: str) -> None:
    message = SAMPLES[tag]
    frame = encode(message)
    assert json.loads(frame)["type"] == tag
    assert decode(frame) == message
    assert decode(frame.encode()) == message


def _required_field(tag: str) -> str:
    fields = MESSAGE_TYPES[tag].model_fields
    return next(name for name, f in fields.items() if f.is_required() and name != "type")


@pytest.mark.parametrize("tag", ALL_TYPES)
def test_message_with_a_missing_field_is_invalid(tag: str) -> None:
    data = json.loads(encode(SAMPLES[tag]))
    field = _required_field(tag)
    del data[field]
    with pytest.raises(InvalidMessage, match=field):
        decode(json.dumps(data))


@pytest.mark.parametrize("tag", ALL_TYPES)
def test_message_with_an_extra_field_is_invalid(tag: str) -> None:
    data = json.loads(encode(SAMPLES[tag]))
    data["surprise"] = 1
    with pytest.raises(InvalidMessage, match="surprise"):
        decode(json.dumps(data))


@pytest.mark.parametrize("tag", ALL_TYPES)
def test_message_with_a_wrongly_typed_field_is_invalid(tag: str) -> None:
    data = json.loads(encode(SAMPLES[tag]))
    field = _required_field(tag)
    data[field] = {"not": "right"}
    with pytest.raises(InvalidMessage) as info:
        decode(json.dumps(data))
    assert info.value.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("{", MalformedFrame),
        ("", MalformedFrame),
        (b"\xff\xfe{}", MalformedFrame),
        ("[]", MalformedFrame),
        ("42", MalformedFrame),
        ('{"type": "teleport"}', UnknownMessageType),
        ('{"type": 7}', InvalidMessage),
        ("{}", InvalidMessage),
    ],
)
def test_undecodable_frames_raise_typed_errors(
    frame: str | bytes, error: type[DecodeError]
) -> None:
    with pytest.raises(error) as info:
        decode(frame)
    assert info.value.code is error.code


def test_oversized_frame_is_refused_before_parsing() -> None:
    frame = encode(SAMPLES["delta"])
    with pytest.raises(FrameTooLarge):
        decode(frame, max_bytes=len(frame) - 1)
    assert decode(frame, max_bytes=len(frame)) == SAMPLES["delta"]


def test_size_limit_counts_utf8_bytes_not_characters() -> None:
    frame = encode(SAMPLES["delta"].model_copy(update={"text": "€" * 100}))
    with pytest.raises(FrameTooLarge):
        decode(frame, max_bytes=len(frame) + 10)


def test_update_offer_refuses_a_manifest_that_is_not_a_bundle_manifest() -> None:
    data = json.loads(encode(SAMPLES["update_offer"]))
    data["manifest"] = json.dumps({"name": "x"})
    with pytest.raises(InvalidMessage, match="manifest"):
        decode(json.dumps(data))


def test_update_offer_exposes_the_parsed_manifest() -> None:
    offer = decode(encode(SAMPLES["update_offer"]))
    assert offer.type == "update_offer"
    assert offer.bundle.version == 3
    assert [f.kind for f in offer.bundle.files] == ["adapter", "coverage"]


def test_placeholders_must_look_like_placeholders() -> None:
    data = json.loads(encode(SAMPLES["escalate"]))
    data["placeholders"] = ["4111 1111 1111 1111"]
    with pytest.raises(InvalidMessage, match="placeholders"):
        decode(json.dumps(data))


def test_error_codes_live_in_their_documented_ranges() -> None:
    ranges = {
        "frames": range(1000, 1100),
        "auth": range(1100, 1200),
        "requests": range(1200, 1300),
        "updates": range(1300, 1400),
        "server": range(1900, 2000),
    }
    for code in ErrorCode:
        assert any(code in r for r in ranges.values()), code


def test_the_union_adapter_is_module_level_and_discriminated() -> None:
    schema = MESSAGE_ADAPTER.json_schema()
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(schema["discriminator"]["mapping"]) == set(ALL_TYPES)
