"""One valid example of every message type.

They appear in SPEC.md (generated from here) and the tests round-trip each of them. The nonces,
keys and signatures are placeholders of the right shape, not working credentials.
"""

from __future__ import annotations

__all__ = ["EXAMPLES", "MANIFEST"]

from datetime import UTC, datetime

from protocol.errors import ErrorCode
from protocol.messages import (
    Ack,
    Auth,
    Cancel,
    Challenge,
    Chunk,
    Delta,
    Enroll,
    Enrolled,
    Escalate,
    Feedback,
    Fetch,
    Goodbye,
    Hello,
    Message,
    Report,
    Result,
    UpdateOffer,
    UpdateStatus,
    Welcome,
    make_error,
)
from protocol.parts import (
    BaseModelRef,
    BundleFile,
    BundleManifest,
    ChatMessage,
    DeviceResources,
    KeyEndorsement,
    Limits,
    RouteCounts,
    Usage,
)

SHA = "ab" * 32
NONCE = "A" * 43
KEY = "B" * 43
SIG = "C" * 86
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

MANIFEST = BundleManifest(
    name="northwind-facts",
    version=3,
    base_model_sha256=SHA,
    files=[
        BundleFile(name="adapter.gguf", kind="adapter", sha256=SHA, size=9_700_000),
        BundleFile(name="coverage.json", kind="coverage", sha256=SHA, size=2048),
    ],
    created_at=T0,
    expires_at=datetime(2026, 12, 27, 12, 0, tzinfo=UTC),
    metrics={"fact_accuracy": 0.92, "simple_intents": 1.0},
)

EXAMPLES: dict[str, Message] = {
    "hello": Hello(
        versions=["1.0"],
        device_id="dev_1",
        sdk="edgeloop-python/0.1.0",
        base_model=BaseModelRef(id="SmolLM2-135M-Instruct-Q4_1", sha256=SHA),
        adapter_version=2,
        capabilities=["stream", "cancel", "feedback", "report", "updates"],
        resources=DeviceResources(cores=2, memory_mb=2048, battery_pct=80, thermal="nominal"),
    ),
    "challenge": Challenge(
        version="1.0",
        server_id="cloud-1",
        nonce=NONCE,
        server_time=1_800_000_000,
        proof_window_s=120,
    ),
    "auth": Auth(device_id="dev_1", nonce=NONCE, timestamp=1_800_000_000, signature=SIG),
    "enroll": Enroll(
        token="tok_abcdefgh",
        public_key=KEY,
        nonce=NONCE,
        timestamp=1_800_000_000,
        signature=SIG,
        name="kiosk-aisle-3",
    ),
    "enrolled": Enrolled(device_id="dev_1", server_key=KEY),
    "welcome": Welcome(
        version="1.0",
        session_id="ses_1",
        server_id="cloud-1",
        device_id="dev_1",
        capabilities=["stream", "cancel", "knowledge"],
        limits=Limits(
            max_message_bytes=1 << 20, max_in_flight=8, max_requests_per_minute=600, heartbeat_s=20
        ),
        signing_keys=[KeyEndorsement(public_key="D" * 43, signature=SIG)],
    ),
    "goodbye": Goodbye(reason="shutdown", retry_after_s=5),
    "error": make_error(ErrorCode.OVERLOADED, "try later", request_id="req_1", data={"queue": 40}),
    "escalate": Escalate(
        request_id="req_1",
        messages=[ChatMessage(role="user", content="Pay with <CARD_1> and compare plans")],
        placeholders=["<CARD_1>"],
        intent="billing.compare",
        intent_confidence=0.4,
        reasons=["difficulty.comparison"],
        priority="online",
        deadline_ms=8000,
        max_tokens=256,
        stream=True,
    ),
    "delta": Delta(request_id="req_1", seq=0, text="Plan A "),
    "result": Result(
        request_id="req_1",
        text="Plan A costs less.",
        finish_reason="stop",
        usage=Usage(prompt_tokens=40, completion_tokens=6),
        model="smollm2-135m",
        sources=["kb-07"],
    ),
    "cancel": Cancel(request_id="req_1", reason="user left"),
    "feedback": Feedback(
        idempotency_key="idk_1", request_id="req_1", rating="negative", correction="Plan B."
    ),
    "report": Report(
        idempotency_key="idk_2",
        period_start=T0,
        period_end=T0,
        routes=RouteCounts(local=10, cloud=3, local_only=1, local_fallback=0),
        reasons={"privacy.card": 1, "intent.match": 10},
        adapter_version=2,
    ),
    "ack": Ack(idempotency_key="idk_1", duplicate=True),
    "update_offer": UpdateOffer(manifest=MANIFEST.model_dump_json(), signature=SIG),
    "fetch": Fetch(request_id="req_2", version=3, file="adapter.gguf", offset=0, length=65536),
    "chunk": Chunk(request_id="req_2", file="adapter.gguf", offset=0, length=4, size=9_700_000),
    "update_status": UpdateStatus(
        idempotency_key="idk_3",
        version=3,
        status="rolled_back",
        reason="self-check: empty output",
        self_check={"nonempty": 0.0},
    ),
}
