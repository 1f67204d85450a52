"""Property-based checks: random and mutated frames never crash the decoder or the sessions,
and a refused frame never half-applies a state change."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    ClientSession,
    CloseFrame,
    DecodeError,
    ProtocolViolation,
    ServerSession,
    decode,
    encode,
)
from protocol.examples import EXAMPLES as SAMPLES
from tests.protocol.harness import make_server, open_pair

SAMPLE_JSON = [json.loads(encode(m)) for m in SAMPLES.values()]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    """A valid frame with one or more fields deleted, added, or replaced by random JSON."""
    data: dict[str, Any] = dict(draw(st.sampled_from(SAMPLE_JSON)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["delete", "add", "replace", "retype"]))
        keys = sorted(data)
        if action == "delete" and keys:
            del data[draw(st.sampled_from(keys))]
        elif action == "add":
            data[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
        elif action == "replace" and keys:
            data[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            data["type"] = draw(st.sampled_from([*SAMPLES, "nope", 3, None]))
    return json.dumps(data)


any_text_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    mutated_frames(),
    st.sampled_from([encode(m) for m in SAMPLES.values()]),
)
frames = st.one_of(any_text_frames, st.binary(max_size=64).map(lambda b: ("binary", b)))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(any_text_frames)
def test_decoder_returns_a_message_or_raises_a_decode_error(frame: str | bytes) -> None:
    try:
        message = decode(frame, max_bytes=4096)
    except DecodeError as exc:
        assert exc.code.wire_name
        return
    assert decode(encode(message)) == message


def snapshot(session: ServerSession | ClientSession) -> tuple[object, ...]:
    flights = tuple(
        sorted((rid, f.kind, f.next_seq, f.cancelled) for rid, f in session._flights.items())
    )
    pending = getattr(session, "_pending_chunk", None)
    return (session.state, session.closed, flights, pending)


def check_frame(session: ServerSession | ClientSession, frame: object) -> None:
    was_closed = session.closed
    before = snapshot(session)
    if isinstance(frame, tuple):
        session.receive_binary(frame[1])
    else:
        session.receive_text(frame)  # type: ignore[arg-type]
    events = session.events_received()
    sent = session.data_to_send()
    if was_closed:
        assert events == [] and sent == [], "a closed session must stay silent"
        return
    if any(isinstance(e, ProtocolViolation) for e in events):
        after = snapshot(session)
        if not session.closed:
            assert after == before, "a refused frame changed the session's state"
        assert sent, "a violation must be answered"
    closes = [f for f in sent if isinstance(f, CloseFrame)]
    assert len(closes) <= 1 and (not closes or sent[-1] is closes[0])
    limit = session.limits.max_in_flight if session.limits else 1
    assert session.in_flight_count <= limit


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(frames, max_size=25))
def test_an_open_server_session_survives_any_frame_sequence(seq: list[object]) -> None:
    pair = open_pair()
    for frame in seq:
        check_frame(pair.server, frame)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(frames, max_size=25))
def test_an_open_client_session_survives_any_frame_sequence(seq: list[object]) -> None:
    pair = open_pair()
    for frame in seq:
        check_frame(pair.client, frame)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(frames, max_size=15))
def test_a_fresh_server_session_survives_any_frame_sequence(seq: list[object]) -> None:
    server = make_server()
    for frame in seq:
        check_frame(server, frame)
    assert server.device_id is None or server.is_open or server.closed
