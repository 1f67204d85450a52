"""The sans-I/O session machine: the full happy path and every refusal, with no event loop."""

from __future__ import annotations

import json

import pytest

from protocol import (
    Ack,
    AckReceived,
    Auth,
    AuthRequested,
    Cancel,
    CancelRequested,
    ChatMessage,
    Chunk,
    ChunkReceived,
    ClientSession,
    CloseCode,
    CloseFrame,
    Delta,
    DeltaReceived,
    DeviceCredentials,
    EnrollmentCompleted,
    EnrollmentCredentials,
    ErrorCode,
    Escalate,
    EscalationReceived,
    Feedback,
    FeedbackReceived,
    Fetch,
    FetchReceived,
    FrameTooLarge,
    Goodbye,
    GoodbyeReceived,
    InvalidMessage,
    PeerError,
    ProtocolViolation,
    RequestCancelled,
    RequestFailed,
    Result,
    ResultReceived,
    SessionClosed,
    SessionStateError,
    TextFrame,
    UpdateOffered,
    UpdateStatus,
    UpdateStatusReceived,
    Usage,
    Welcomed,
    check_endpoint,
    encode,
    make_error,
    sign_proof,
)
from protocol.examples import EXAMPLES as SAMPLES
from shared import SigningKey, VerifyKey
from tests.protocol.harness import (
    NOW,
    SERVER_KEY,
    Clock,
    Pair,
    enrolling_pair,
    feed,
    make_server,
    open_pair,
)


def escalate(request_id: str = "req_1", stream: bool = True) -> Escalate:
    return Escalate(
        request_id=request_id,
        messages=[ChatMessage(role="user", content="Which plan is cheaper for <PHONE_1>?")],
        placeholders=["<PHONE_1>"],
        deadline_ms=5000,
        max_tokens=64,
        stream=stream,
    )


def result(request_id: str = "req_1", text: str = "Plan A.") -> Result:
    return Result(
        request_id=request_id,
        text=text,
        finish_reason="stop",
        usage=Usage(prompt_tokens=10, completion_tokens=3),
        model="test",
    )


def errors_sent_by(frames: list[object]) -> list[dict[str, object]]:
    return [
        json.loads(f.data)
        for f in frames
        if isinstance(f, TextFrame) and json.loads(f.data)["type"] == "error"
    ]


def close_of(frames: list[object]) -> CloseFrame | None:
    closes = [f for f in frames if isinstance(f, CloseFrame)]
    return closes[-1] if closes else None


# --- happy path ---------------------------------------------------------------------------


def test_device_enrolls_with_a_token_and_is_welcomed_in_the_same_session() -> None:
    pair = enrolling_pair()
    [done] = pair.of("client", EnrollmentCompleted)
    assert done.device_id == "dev_1"
    assert VerifyKey.from_b64(done.server_key) == SERVER_KEY.verify_key()
    [welcomed] = pair.of("client", Welcomed)
    assert welcomed.welcome.device_id == "dev_1"
    assert pair.client.is_open and pair.server.is_open
    assert pair.tokens == set(), "the one-time token is used up"


def test_enrolled_device_authenticates_and_learns_the_limits() -> None:
    key = SigningKey.generate()
    clock = Clock()
    client = ClientSession(DeviceCredentials("dev_1", key), sdk="test/1", clock=clock)
    pair = Pair(client, make_server(clock), devices={"dev_1": key.verify_key()})
    client.start()
    pair.pump()
    assert [type(e).__name__ for e in pair.server_events][:2] == ["HelloReceived", "AuthRequested"]
    [welcomed] = pair.of("client", Welcomed)
    assert welcomed.welcome.version == "1.0"
    assert client.limits is not None and client.limits.max_in_flight == 2
    assert client.max_message_bytes == 4096


def test_escalation_streams_ordered_deltas_then_exactly_one_result() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    [received] = pair.of("server", EscalationReceived)
    assert received.request.placeholders == ["<PHONE_1>"]
    for seq, text in enumerate(["Plan ", "A."]):
        pair.server.send(Delta(request_id="req_1", seq=seq, text=text))
    pair.server.send(result())
    pair.pump()
    deltas = pair.of("client", DeltaReceived)
    assert [d.delta.text for d in deltas] == ["Plan ", "A."]
    [final] = pair.of("client", ResultReceived)
    assert final.result.text == "Plan A." and not final.cancelled_locally
    assert pair.client.in_flight_count == 0 and pair.server.in_flight_count == 0


def test_has_data_to_send_says_whether_frames_wait() -> None:
    pair = open_pair()
    assert not pair.server.has_data_to_send
    pair.client.send(escalate())
    pair.pump()
    assert not pair.server.has_data_to_send, "a request alone queues no frame"
    pair.server.send(result())
    assert pair.server.has_data_to_send
    assert len(pair.server.data_to_send()) == 1
    assert not pair.server.has_data_to_send


def test_device_cancel_is_answered_by_exactly_one_terminal_frame() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.client.send(Cancel(request_id="req_1", reason="user left"))
    pair.pump()
    assert [e.request_id for e in pair.of("server", CancelRequested)] == ["req_1"]
    assert pair.client.in_flight("req_1"), "the slot stays taken until the server ends it"
    pair.server.send(make_error(ErrorCode.CANCELLED, "cancelled", request_id="req_1"))
    pair.pump()
    [failed] = pair.of("client", RequestFailed)
    assert failed.cancelled_locally and failed.error.name == "cancelled"
    assert pair.client.in_flight_count == 0


def test_a_cancel_that_races_the_result_is_harmless() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.server.send(result())  # the result is on the wire ...
    pair.client.send(Cancel(request_id="req_1"))  # ... when the device cancels
    pair.pump()
    [final] = pair.of("client", ResultReceived)
    assert final.cancelled_locally
    assert not pair.of("server", ProtocolViolation) and not pair.of("client", ProtocolViolation)
    assert pair.server.is_open and pair.client.is_open
    pair.client.send(Cancel(request_id="req_1"))  # cancelling a finished request: a no-op
    assert pair.client.data_to_send() == []


def test_server_may_cancel_a_request_which_ends_it() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.server.send(Cancel(request_id="req_1", reason="draining"))
    pair.pump()
    [cancelled] = pair.of("client", RequestCancelled)
    assert cancelled.message.reason == "draining"
    assert pair.client.in_flight_count == 0 and pair.server.in_flight_count == 0


def test_feedback_is_acknowledged_and_a_resend_is_acknowledged_again() -> None:
    pair = open_pair()
    feedback = Feedback(idempotency_key="idk_1", request_id="req_9", rating="positive")
    stored: dict[str, Feedback] = {}
    for _ in range(2):
        pair.client.send(feedback)
        pair.pump()
        [received] = pair.of("server", FeedbackReceived)
        pair.server_events.clear()
        duplicate = received.message.idempotency_key in stored
        stored.setdefault(received.message.idempotency_key, received.message)
        pair.server.send(Ack(idempotency_key="idk_1", duplicate=duplicate))
        pair.pump()
    acks = [e.ack for e in pair.of("client", AckReceived)]
    assert [a.duplicate for a in acks] == [False, True]
    assert len(stored) == 1


def test_fetch_is_answered_by_a_chunk_header_and_one_binary_frame() -> None:
    pair = open_pair()
    pair.client.send(Fetch(request_id="req_f", version=3, file="adapter.gguf", offset=4, length=8))
    pair.pump()
    [fetch] = pair.of("server", FetchReceived)
    assert (fetch.request.offset, fetch.request.length) == (4, 8)
    data = b"GGUF\x03\x00\x00\x00"
    header = Chunk(request_id="req_f", file="adapter.gguf", offset=4, length=len(data), size=100)
    pair.server.send_chunk(header, data)
    pair.pump()
    [chunk] = pair.of("client", ChunkReceived)
    assert chunk.data == data and chunk.header.offset == 4
    assert pair.client.in_flight_count == 0


def test_update_offer_reaches_the_device_and_its_status_reaches_the_server() -> None:
    pair = open_pair()
    pair.server.send(SAMPLES["update_offer"])
    pair.pump()
    [offer] = pair.of("client", UpdateOffered)
    assert offer.offer.bundle.name == "northwind-facts"
    status = UpdateStatus(idempotency_key="idk_u", version=3, status="applied")
    pair.client.send(status)
    pair.pump()
    [got] = pair.of("server", UpdateStatusReceived)
    assert got.message == status


def test_goodbye_closes_both_sides_normally() -> None:
    pair = open_pair()
    pair.client.send(Goodbye(reason="client_closing"))
    pair.pump()
    assert pair.client.closed and pair.server.closed
    assert pair.server.close_code == CloseCode.NORMAL


def test_a_server_goodbye_closes_with_the_code_its_reason_calls_for() -> None:
    for reason, code in (
        ("shutdown", CloseCode.GOING_AWAY),
        ("session_replaced", CloseCode.SESSION_REPLACED),
    ):
        pair = open_pair()
        pair.server.send(Goodbye(reason=reason, retry_after_s=5))
        assert pair.server.close_code == code
        pair.pump()
        (goodbye,) = pair.of("client", GoodbyeReceived)
        assert goodbye.message.reason == reason and goodbye.message.retry_after_s == 5


def test_connection_loss_ends_every_request_in_flight() -> None:
    pair = open_pair()
    pair.client.send(escalate("req_1"))
    pair.client.send(escalate("req_2"))
    pair.pump()
    pair.client.receive_close(1006, "abnormal")
    failed = {
        e.request_id: e.error.name
        for e in pair.client.events_received()
        if isinstance(e, RequestFailed)
    }
    assert failed == {"req_1": "connection_lost", "req_2": "connection_lost"}


# --- refusals -----------------------------------------------------------------------------


def test_a_version_mismatch_gets_a_typed_error_listing_the_supported_versions() -> None:
    clock = Clock()
    client = ClientSession(
        DeviceCredentials("dev_1", SigningKey.generate()), sdk="t/1", versions=("2.0",), clock=clock
    )
    server = make_server(clock)
    client.start()
    feed(server, client.data_to_send())
    frames = server.data_to_send()
    [error] = errors_sent_by(frames)
    assert error["name"] == "unsupported_version" and error["data"] == {"supported": ["1.0"]}
    assert close_of(frames) == CloseFrame(CloseCode.UNSUPPORTED_VERSION, close_of(frames).reason)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "tag", ["escalate", "feedback", "fetch", "report", "update_status", "cancel"]
)
def test_nothing_but_session_messages_before_authentication(tag: str) -> None:
    server = make_server()
    server.receive_text(encode(SAMPLES["hello"]))
    server.data_to_send()
    server.receive_text(encode(SAMPLES[tag]))
    frames = server.data_to_send()
    assert errors_sent_by(frames)[0]["name"] == "unexpected_message"
    assert close_of(frames).code == CloseCode.POLICY_VIOLATION  # type: ignore[union-attr]
    assert not any(isinstance(e, EscalationReceived) for e in server.events_received())


def _challenged_server(clock: Clock | None = None) -> tuple[object, str]:
    server = make_server(clock or Clock())
    server.receive_text(encode(SAMPLES["hello"].model_copy(update={"device_id": "dev_1"})))
    [challenge] = [json.loads(f.data) for f in server.data_to_send()]  # type: ignore[union-attr]
    return server, challenge["nonce"]


def test_a_bad_signature_is_refused_with_1008() -> None:
    device_key, impostor = SigningKey.generate(), SigningKey.generate()
    server, nonce = _challenged_server()
    sig = sign_proof(impostor, "auth", "cloud-test", nonce, int(NOW), "dev_1")
    server.receive_text(
        encode(Auth(device_id="dev_1", nonce=nonce, timestamp=int(NOW), signature=sig))
    )  # type: ignore[attr-defined]
    assert [e.device_id for e in server.events_received() if isinstance(e, AuthRequested)] == [
        "dev_1"
    ]  # type: ignore[attr-defined]
    assert server.accept(device_key.verify_key(), session_id="s") is False  # type: ignore[attr-defined]
    frames = server.data_to_send()  # type: ignore[attr-defined]
    assert errors_sent_by(frames)[0]["name"] == "bad_signature"
    assert close_of(frames).code == CloseCode.POLICY_VIOLATION  # type: ignore[union-attr]


def test_a_proof_replayed_on_another_connection_is_refused() -> None:
    key = SigningKey.generate()
    first, nonce = _challenged_server()
    proof = Auth(
        device_id="dev_1", nonce=nonce, timestamp=int(NOW),
        signature=sign_proof(key, "auth", "cloud-test", nonce, int(NOW), "dev_1"),
    )  # fmt: skip
    second, _ = _challenged_server()
    second.receive_text(encode(proof))  # type: ignore[attr-defined]
    frames = second.data_to_send()  # type: ignore[attr-defined]
    assert errors_sent_by(frames)[0]["name"] == "proof_replayed"
    assert close_of(frames).code == CloseCode.POLICY_VIOLATION  # type: ignore[union-attr]


def test_a_proof_reused_on_the_same_connection_is_refused() -> None:
    key = SigningKey.generate()
    pair = open_pair(key)
    nonce = pair.server.nonce
    assert nonce is not None
    proof = Auth(
        device_id="dev_1", nonce=nonce, timestamp=int(NOW),
        signature=sign_proof(key, "auth", "cloud-test", nonce, int(NOW), "dev_1"),
    )  # fmt: skip
    pair.server.receive_text(encode(proof))
    assert errors_sent_by(pair.server.data_to_send())[0]["name"] == "unexpected_message"
    assert not any(isinstance(e, AuthRequested) for e in pair.server.events_received())


@pytest.mark.parametrize("skew", [-121, 121])
def test_a_proof_outside_the_time_window_is_refused(skew: int) -> None:
    key = SigningKey.generate()
    server, nonce = _challenged_server()
    ts = int(NOW) + skew
    server.receive_text(encode(Auth(  # type: ignore[attr-defined]
        device_id="dev_1", nonce=nonce, timestamp=ts,
        signature=sign_proof(key, "auth", "cloud-test", nonce, ts, "dev_1"),
    )))  # fmt: skip
    assert errors_sent_by(server.data_to_send())[0]["name"] == "proof_expired"  # type: ignore[attr-defined]


def test_an_unknown_device_is_refused() -> None:
    clock = Clock()
    client = ClientSession(
        DeviceCredentials("dev_404", SigningKey.generate()), sdk="t/1", clock=clock
    )
    pair = Pair(client, make_server(clock))
    client.start()
    pair.pump()
    [error] = pair.of("client", PeerError)
    assert error.error.name == "unknown_device"
    assert client.closed and pair.server.closed


def test_an_invalid_enrollment_token_is_refused() -> None:
    pair = enrolling_pair(valid=False)
    [error] = pair.of("client", PeerError)
    assert error.error.name == "invalid_enrollment_token"
    assert pair.devices == {}


def test_an_enrollment_proof_by_another_key_is_refused() -> None:
    server, nonce = _challenged_server()
    real, other = SigningKey.generate(), SigningKey.generate()
    public = real.verify_key().b64()
    server.receive_text(encode(SAMPLES["enroll"].model_copy(update={  # type: ignore[attr-defined]
        "public_key": public, "nonce": nonce, "timestamp": int(NOW),
        "signature": sign_proof(other, "enroll", "cloud-test", nonce, int(NOW), public),
    })))  # fmt: skip
    assert errors_sent_by(server.data_to_send())[0]["name"] == "bad_signature"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("frame", "name"),
    [
        ("{not json", "malformed_frame"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "cancel"}', "invalid_message"),
        ('{"type": "cancel", "request_id": "r", "extra": 1}', "invalid_message"),
        ('{"type": "cancel", "request_id": 5}', "invalid_message"),
        (encode(SAMPLES["welcome"]), "unexpected_message"),
    ],
)
def test_bad_frames_after_authentication_get_typed_errors_and_change_nothing(
    frame: str, name: str
) -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.server_events.clear()
    pair.server.receive_text(frame)
    frames = pair.server.data_to_send()
    assert [e["name"] for e in errors_sent_by(frames)] == [name]
    assert close_of(frames) is None
    assert pair.server.is_open and pair.server.in_flight("req_1")
    assert [type(e) for e in pair.server.events_received()] == [ProtocolViolation]


def test_an_oversized_frame_closes_with_1009() -> None:
    pair = open_pair()
    big = encode(
        escalate().model_copy(update={"messages": [ChatMessage(role="user", content="x" * 5000)]})
    )
    pair.server.receive_text(big)
    frames = pair.server.data_to_send()
    assert errors_sent_by(frames)[0]["name"] == "frame_too_large"
    assert close_of(frames).code == CloseCode.MESSAGE_TOO_BIG  # type: ignore[union-attr]


def test_the_device_refuses_to_send_a_frame_larger_than_the_server_takes() -> None:
    pair = open_pair()  # the server takes 4096 bytes
    text = "é" * 1500  # 1500 characters, 3000 bytes: only bytes count
    big = escalate().model_copy(update={"messages": [ChatMessage(role="user", content=text * 2)]})
    with pytest.raises(FrameTooLarge, match="the server takes at most 4096"):
        pair.client.send(big)
    # Nothing went out and nothing is in flight: the same request id may be used again.
    assert pair.client.data_to_send() == [] and pair.client.can_start_request()
    small = escalate().model_copy(update={"messages": [ChatMessage(role="user", content=text)]})
    pair.client.send(small)
    pair.pump()
    assert pair.server.in_flight("req_1") and pair.client.is_open


def test_an_oversized_binary_frame_closes_with_1009() -> None:
    pair = open_pair()
    pair.client.receive_binary(b"\0" * 5000)
    assert close_of(pair.client.data_to_send()).code == CloseCode.MESSAGE_TOO_BIG  # type: ignore[union-attr]


def test_a_duplicate_request_id_is_refused_and_the_original_keeps_running() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.server_events.clear()
    pair.server.receive_text(encode(escalate()))
    [error] = errors_sent_by(pair.server.data_to_send())
    assert error["name"] == "duplicate_request" and "request_id" not in error
    assert error["data"] == {"request_id": "req_1"}
    assert not any(isinstance(e, EscalationReceived) for e in pair.server.events_received())
    pair.server.send(result())
    pair.pump()
    assert len(pair.of("client", ResultReceived)) == 1


def test_the_in_flight_limit_is_enforced_on_both_sides() -> None:
    pair = open_pair()
    pair.client.send(escalate("req_1"))
    pair.client.send(escalate("req_2"))
    assert not pair.client.can_start_request()
    with pytest.raises(SessionStateError):
        pair.client.send(escalate("req_3"))
    pair.pump()
    pair.server.receive_text(encode(escalate("req_3")))  # a client that ignores the limit
    [error] = errors_sent_by(pair.server.data_to_send())
    assert error["name"] == "too_many_in_flight" and error["request_id"] == "req_3"
    assert error["retryable"] is True
    assert not pair.server.in_flight("req_3")


def test_a_reply_to_an_unknown_request_gets_unknown_request() -> None:
    pair = open_pair()
    pair.client.receive_text(encode(result("req_nope")))
    [error] = errors_sent_by(pair.client.data_to_send())
    assert error["name"] == "unknown_request"
    assert not any(isinstance(e, ResultReceived) for e in pair.client.events_received())


def test_deltas_out_of_order_are_refused() -> None:
    pair = open_pair()
    pair.client.send(escalate())
    pair.pump()
    pair.client.receive_text(encode(Delta(request_id="req_1", seq=1, text="skipped zero")))
    assert errors_sent_by(pair.client.data_to_send())[0]["name"] == "unexpected_message"
    assert not any(isinstance(e, DeltaReceived) for e in pair.client.events_received())
    with pytest.raises(SessionStateError):
        pair.server.send(Delta(request_id="req_1", seq=1, text="server bug"))


def test_a_binary_frame_without_a_chunk_header_is_refused() -> None:
    pair = open_pair()
    pair.client.receive_binary(b"\x00\x01")
    assert errors_sent_by(pair.client.data_to_send())[0]["name"] == "unexpected_binary"
    pair.server.receive_binary(b"\x00\x01")
    assert errors_sent_by(pair.server.data_to_send())[0]["name"] == "unexpected_binary"


def test_a_chunk_whose_binary_frame_has_the_wrong_length_is_refused() -> None:
    pair = open_pair()
    pair.client.send(Fetch(request_id="req_f", version=1, file="a.gguf", offset=0, length=4))
    pair.pump()
    pair.client.receive_text(
        encode(Chunk(request_id="req_f", file="a.gguf", offset=0, length=4, size=4))
    )
    pair.client.receive_binary(b"\x00")
    assert errors_sent_by(pair.client.data_to_send())[0]["name"] == "invalid_message"
    assert pair.client.in_flight("req_f")


def test_a_peer_that_keeps_violating_is_closed_with_4000() -> None:
    pair = open_pair()
    for _ in range(pair.server.max_violations + 1):
        pair.server.receive_text("{")
    assert close_of(pair.server.data_to_send()).code == CloseCode.PROTOCOL_VIOLATION  # type: ignore[union-attr]
    assert pair.server.closed


def test_our_own_misuse_raises_instead_of_sending() -> None:
    pair = open_pair()
    with pytest.raises(SessionStateError):
        pair.server.send(result("req_never"))
    with pytest.raises(SessionStateError):
        pair.client.send(SAMPLES["result"])  # the client does not send results
    with pytest.raises(SessionStateError):
        pair.server.send(SAMPLES["welcome"])
    fresh = make_server()
    with pytest.raises(SessionStateError):
        fresh.send(Ack(idempotency_key="k"))


def test_a_closed_session_ignores_input_and_refuses_output() -> None:
    pair = open_pair()
    pair.server.close(CloseCode.GOING_AWAY, "bye")
    pair.server.data_to_send()
    pair.server.receive_text(encode(escalate()))
    assert pair.server.data_to_send() == []
    assert [type(e) for e in pair.server.events_received()] == [SessionClosed]
    with pytest.raises(SessionStateError):
        pair.server.send(Ack(idempotency_key="k"))


def test_credentials_the_enroll_message_could_not_carry_are_refused_at_once() -> None:
    key = SigningKey.generate()
    assert EnrollmentCredentials("elt_" + "x" * 20, key, name="kiosk").token.startswith("elt_")
    with pytest.raises(InvalidMessage, match="enrollment token"):
        EnrollmentCredentials("elt_bad", key)
    with pytest.raises(InvalidMessage, match="enrollment name"):
        EnrollmentCredentials("elt_" + "x" * 20, key, name="n" * 300)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:8765/v1", "expected ws:// or wss://"),
        ("127.0.0.1:8765", "expected ws:// or wss://"),
        ("ws:///v1", "no host"),
        ("ws://127.0.0.1:99999/v1", "not a valid URL"),
    ],
)
def test_an_endpoint_must_be_a_websocket_url_with_a_host(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_endpoint(url)


def test_websocket_urls_pass_as_they_are() -> None:
    for url in ("ws://127.0.0.1:8765/v1", "wss://cloud.example.com/v1", "ws://[::1]:80/v1"):
        assert check_endpoint(url) == url
