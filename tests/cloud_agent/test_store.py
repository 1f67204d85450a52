"""One storage suite, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from cloud_agent.errors import EnrollmentRefused, StoreError, StoreUnavailable
from cloud_agent.store import (
    NewFeedback,
    NewInteraction,
    NewReport,
    NewUpdateStatus,
    RouteCounts,
    SessionEvent,
    Store,
    tables,
)
from cloud_agent.store.interactions import INTERACTION_COLUMNS, SqliteBatchInsert
from cloud_agent.store.store import hash_token, sqlite_url
from cloud_agent.store.tables import INTERACTIONS, Base
from protocol import ChatMessage

KEY_A = "A" * 43
KEY_B = "B" * 43


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "cloud.db")
    else:
        url = request.getfixturevalue("postgres_db")  # emptied for the next test
    opened = await Store.open(url)
    try:
        yield opened
    finally:
        await opened.close()


async def enrolled(store: Store, device_id: str = "dev_a", key: str = KEY_A) -> str:
    token = await store.create_enrollment_token()
    await store.enroll_device(token, device_id, key, name="kiosk")
    return device_id


async def ten_enrolled(store: Store) -> list[str]:
    """Ten devices, each with its own key: dev_0 ... dev_9."""
    return [await enrolled(store, f"dev_{n}", chr(ord("A") + n) * 43) for n in range(10)]


async def test_migrations_produce_exactly_the_declared_schema(store: Store) -> None:
    async with store.engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
    assert diff == []


async def test_opening_twice_is_idempotent(store: Store) -> None:
    again = await Store.open(store.engine.url.render_as_string(hide_password=False))
    await again.ping()
    await again.close()


async def test_a_token_enrolls_exactly_one_device(store: Store) -> None:
    token = await store.create_enrollment_token(note="aisle 3")
    device = await store.enroll_device(token, "dev_a", KEY_A, name="kiosk")
    assert device.id == "dev_a" and not device.revoked
    with pytest.raises(EnrollmentRefused):
        await store.enroll_device(token, "dev_b", KEY_B)
    assert [d.id for d in await store.list_devices()] == ["dev_a"]


async def test_tokens_are_stored_hashed_and_expire(store: Store) -> None:
    token = await store.create_enrollment_token(ttl=timedelta(seconds=-1))
    async with store.engine.connect() as conn:
        stored = (await conn.exec_driver_sql("SELECT token_sha256 FROM enrollment_tokens")).all()
    assert stored == [(hash_token(token),)]
    with pytest.raises(EnrollmentRefused):
        await store.enroll_device(token, "dev_a", KEY_A)
    with pytest.raises(EnrollmentRefused):
        await store.enroll_device("elt_never_issued", "dev_a", KEY_A)
    # A note its column cannot hold is refused before the database sees it (PostgreSQL would
    # fail the write, SQLite would keep it whole).
    with pytest.raises(ValueError, match="at most 256"):
        await store.create_enrollment_token(note="x" * 257)
    assert await store.create_enrollment_token(note="x" * 256)


async def test_a_public_key_enrolls_once(store: Store) -> None:
    await enrolled(store)
    token = await store.create_enrollment_token()
    with pytest.raises(EnrollmentRefused):
        await store.enroll_device(token, "dev_b", KEY_A)


async def test_revoked_devices_are_marked(store: Store) -> None:
    await enrolled(store)
    assert await store.revoke_device("dev_a") is True
    assert await store.revoke_device("dev_a") is False
    device = await store.get_device("dev_a")
    assert device is not None and device.revoked
    assert await store.get_device("dev_nope") is None


async def test_devices_revoked_since_a_moment_are_found(store: Store) -> None:
    ids = await ten_enrolled(store)
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert await store.revoked_since(before) == []
    await store.revoke_device(ids[3])
    await store.revoke_device(ids[7])
    assert sorted(await store.revoked_since(before)) == [ids[3], ids[7]]
    assert await store.revoked_since(datetime.now(UTC) + timedelta(minutes=1)) == []


async def test_the_first_signing_key_recorded_is_the_clusters(store: Store) -> None:
    first, second = "A" * 43, "B" * 43
    assert await store.pin_signing_key(first) == first
    assert await store.pin_signing_key(second) == first
    assert await store.pin_signing_key(first) == first


async def test_a_rotation_makes_the_new_key_the_one_in_use_once(store: Store) -> None:
    first, second, third = "A" * 43, "B" * 43, "C" * 43
    await store.pin_signing_key(first)
    await store.rotate_signing_key(first, second, "s" * 86)
    assert await store.pin_signing_key(first) == second, "the key in use, not the first"
    with pytest.raises(StoreError, match="rotated meanwhile"):  # a second rotation from first
        await store.rotate_signing_key(first, third, "t" * 86)
    assert await store.signing_keys() == [(first, None), (second, "s" * 86)]


async def test_many_devices_are_looked_up_in_one_query(store: Store) -> None:
    ids = await ten_enrolled(store)
    await store.revoke_device("dev_3")
    found = await store.get_devices([*ids[2:5], "dev_nope", ids[2]])
    assert sorted(found) == ["dev_2", "dev_3", "dev_4"]
    assert found["dev_3"].revoked and not found["dev_2"].revoked
    assert found["dev_4"].public_key == "E" * 43
    assert await store.get_devices([]) == {}


async def test_feedback_is_stored_once_per_idempotency_key(store: Store) -> None:
    await enrolled(store)
    assert await store.add_feedback("dev_a", "idk_1", "req_1", "negative", "Plan B") is False
    assert await store.add_feedback("dev_a", "idk_1", "req_1", "negative", "Plan B") is True
    assert await store.add_feedback("dev_a", "idk_2", "req_2", "positive") is False
    summary = await store.feedback_summary()
    assert (summary.positive, summary.negative, summary.corrections) == (1, 1, 1)


async def test_a_feedback_batch_is_one_transaction_storing_each_key_once(store: Store) -> None:
    await enrolled(store)
    await enrolled(store, "dev_b", KEY_B)
    assert await store.add_feedback("dev_a", "idk_1", "req_1", "positive") is False
    batch = [
        NewFeedback("dev_a", "idk_1", "req_1", "positive"),  # a resend of the one above
        NewFeedback("dev_a", "idk_2", "req_2", "negative", "Plan B", adapter_version=3),
        NewFeedback("dev_b", "idk_1", "req_1", "negative"),  # same key, another device
        NewFeedback("dev_a", "idk_2", "req_2", "positive"),  # same key again in the batch
    ]
    assert list((await store.add_feedback_batch(batch)).values()) == [True, False, False, True]
    summary = await store.feedback_summary()
    assert (summary.positive, summary.negative, summary.corrections) == (1, 2, 1)
    # A batch the database refuses (a device that is not enrolled) stores none of its items.
    with pytest.raises(StoreError):
        await store.add_feedback_batch(
            [NewFeedback("dev_a", "idk_3", "req_3", "positive"),
             NewFeedback("dev_nobody", "idk_1", "req_1", "positive")]
        )  # fmt: skip
    assert await store.add_feedback("dev_a", "idk_3", "req_3", "positive") is False


def report(
    device_id: str,
    key: str,
    *,
    ended: datetime | None = None,
    version: int | None = None,
    reasons: dict[str, int] | None = None,
    **routes: int,
) -> NewReport:
    """A device report as the inbox stores it: the message in `body`, the summed parts."""
    end = ended or datetime.now(UTC)
    start = end - timedelta(minutes=5)
    body = {"period_start": start.isoformat(), "period_end": end.isoformat(),
            "routes": routes, "reasons": reasons or {}, "adapter_version": version}  # fmt: skip
    return NewReport(device_id, key, body, start, end, RouteCounts(**routes), version)


async def test_reports_and_update_statuses_are_stored_once(store: Store) -> None:
    await enrolled(store)
    first = report("dev_a", "idk_r", local=3)
    assert await store.add_report(first) is False
    assert await store.add_report(report("dev_a", "idk_r", local=3)) is True
    batch = [report("dev_a", "idk_r", local=3), report("dev_a", "idk_s", local=3),
             report("dev_a", "idk_s", cloud=1)]  # fmt: skip
    assert list((await store.add_report_batch(batch)).values()) == [True, False, True]
    async with store.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(tables.Report.body, tables.Report.local, tables.Report.cloud).order_by(
                    tables.Report.idempotency_key
                )
            )
        ).all()
    assert [tuple(row) for row in stored] == [(first.body, 3, 0), (batch[1].body, 3, 0)], (
        "one row per key, the first one kept"
    )
    assert await store.add_update_status("dev_a", "idk_u", 3, "applied", None, {}) is False
    assert await store.add_update_status("dev_a", "idk_u", 3, "applied", None, {}) is True


async def test_training_candidates_are_counted_since_a_moment(store: Store) -> None:
    await enrolled(store)

    def answered(request_id: str, backend: str, status: str = "ok") -> NewInteraction:
        return NewInteraction(
            device_id="dev_a", request_id=request_id, status=status, backend=backend,
            messages=[{"role": "user", "content": f"question {request_id}"}], placeholders=[],
            answer="an answer",
        )  # fmt: skip

    # Quoted from a fact, answered by the LLM and rated up, corrected, rated down, unrated,
    # and a quoted fact that failed.
    for request_id, backend in (("q1", "knowledge"), ("q2", "llm"), ("q3", "llm"),
                                ("q4", "llm"), ("q5", "llm")):  # fmt: skip
        await store.record_interaction(answered(request_id, backend))
    await store.record_interaction(answered("q6", "knowledge", status="error"))
    await store.add_feedback("dev_a", "idk_2", "q2", "positive")
    await store.add_feedback("dev_a", "idk_3", "q3", "negative", "The right answer.")
    await store.add_feedback("dev_a", "idk_4", "q4", "negative")
    assert await store.count_training_candidates() == 3
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert await store.count_training_candidates(later) == 0
    async with store.engine.begin() as conn:  # a rating given after that moment
        await conn.execute(
            update(tables.Feedback).where(tables.Feedback.request_id == "q2")
            .values(created_at=later + timedelta(seconds=1))
        )  # fmt: skip
    assert await store.count_training_candidates(later) == 1


async def test_a_named_job_is_stored_once_and_the_latest_is_found_by_kind(store: Store) -> None:
    assert await store.latest_job("distill") is None
    first = await store.create_job("distill", [{}], {"source": "auto"}, job_id="job_auto_1")
    assert first == "job_auto_1"
    with pytest.raises(IntegrityError):
        await store.create_job("distill", [{}], job_id="job_auto_1")
    await store.create_job("answer", [{"question": "hi?"}])
    latest = await store.latest_job("distill")
    assert latest is not None and (latest.id, latest.status) == ("job_auto_1", "queued")


async def test_interactions_keep_the_redacted_prompt_facts_and_feedback(store: Store) -> None:
    await enrolled(store)
    await store.record_interaction(
        NewInteraction(
            device_id="dev_a",
            request_id="req_1",
            messages=[{"role": "user", "content": "Is shipping free to <ADDRESS_1>?"}],
            placeholders=["<ADDRESS_1>"],
            status="ok",
            answer="Standard shipping is free on orders over $75.",
            route_reasons=["intent.unknown"],
            latency_ms=12,
            prompt_tokens=30,
            completion_tokens=12,
            backend="scripted",
            model="test",
            fact_ids=["free-shipping"],
        )
    )
    await store.add_feedback("dev_a", "idk_1", "req_1", "positive")
    [it] = await store.list_interactions()
    assert it.placeholders == ["<ADDRESS_1>"] and it.fact_ids == ["free-shipping"]
    assert it.rating == "positive" and it.route_reasons == ["intent.unknown"]
    assert await store.list_interactions(device_id="dev_other") == []
    assert it.question == "Is shipping free to <ADDRESS_1>?"


async def test_a_batch_of_interactions_reads_back_field_for_field(store: Store) -> None:
    # SQLite takes the batch as multi-row statements (here 4 + 2 + 1 rows); every kind of
    # value must come back as written, in order.
    await enrolled(store)
    written = [
        NewInteraction(
            device_id="dev_a",
            request_id=f"req_{i}",
            session_id="ses_1" if i else None,
            messages=[{"role": "user", "content": f'Où est "ma" tente {i}?\n\\ ✓ <CARD_1>'},
                      {"role": "assistant", "content": ""}],
            placeholders=["<CARD_1>"] if i else [],
            status="ok" if i else "error",
            priority="offline" if i else "online",
            answer=None if i == 0 else f"Réponse {i} — 12 €",
            error_name="backend_error" if i == 0 else None,
            intent="faq" if i else None,
            route_reasons=["intent.unknown", "length"] if i else [],
            latency_ms=None if i == 0 else 2**31 - 1,
            prompt_tokens=i,
            completion_tokens=2 * i,
            backend="scripted" if i else None,
            model="m" if i else None,
            fact_ids=["free-shipping", "returns"][: i % 3],
        )
        for i in (0, 1, 2, 3, 4, 5, 6)
    ]  # fmt: skip
    if store.engine.dialect.name == "sqlite":
        assert store._sqlite_interactions is not None, "SQLite takes the batch as multi-row"
    before = datetime.now(UTC) - timedelta(seconds=1)
    await store.record_interactions(written, [])
    read = {r.request_id: r for r in await store.list_interactions()}
    assert len(read) == len(written)
    same = ("messages", "placeholders", "answer", "status", "error_name", "intent",
            "route_reasons", "latency_ms", "prompt_tokens", "completion_tokens", "backend",
            "model", "fact_ids")  # fmt: skip
    for it in written:
        got = read[it.request_id]
        assert [getattr(got, f) for f in same] == [getattr(it, f) for f in same]
        assert before <= got.created_at <= datetime.now(UTC)
    async with store.engine.connect() as conn:
        rows = (await conn.exec_driver_sql(
            "SELECT request_id, session_id, priority FROM interactions ORDER BY id"
        )).all()  # fmt: skip
    expected = [(it.request_id, it.session_id, it.priority) for it in written]
    assert [tuple(r) for r in rows] == expected


def test_interaction_rows_are_built_in_the_tables_column_order() -> None:
    # The log builds each row as a tuple (no dict per row): its order is the table's.
    assert list(INTERACTION_COLUMNS) == [c.key for c in INTERACTIONS.columns if not c.primary_key]


async def test_an_escalations_own_messages_are_stored_as_the_json_the_device_sent(
    store: Store,
) -> None:
    # The server hands the log the escalation's `ChatMessage`s and lists as they are, with
    # empty tuples shared between rows; the store keeps their JSON form.
    await enrolled(store)
    messages = [ChatMessage(role="user", content="Do you price-match?"),
                ChatMessage(role="assistant", content="We do."),
                ChatMessage(role="user", content="Online too, for <CARD_1>?")]  # fmt: skip
    await store.record_interactions([
        NewInteraction(device_id="dev_a", request_id="req_1", messages=messages,
                       placeholders=["<CARD_1>"], status="ok", answer="Yes.",
                       route_reasons=["coverage.none"], fact_ids=("price-match",)),
        NewInteraction(device_id="dev_a", request_id="req_2", messages=messages[:1],
                       placeholders=(), status="ok", answer="Yes."),
    ])  # fmt: skip
    rows = {r.request_id: r for r in await store.list_interactions()}
    assert rows["req_1"].messages == [m.model_dump() for m in messages]
    assert rows["req_1"].placeholders == ["<CARD_1>"]
    assert rows["req_1"].route_reasons == ["coverage.none"]
    assert rows["req_1"].fact_ids == ["price-match"]
    assert rows["req_2"].messages == [messages[0].model_dump()]
    assert rows["req_2"].placeholders == rows["req_2"].route_reasons == []
    assert rows["req_2"].fact_ids == []


async def test_sqlite_batches_stay_within_an_old_sqlite_parameter_limit(tmp_path: Path) -> None:
    # Before SQLite 3.32 a statement takes at most 999 parameters: 100 rows of 17 columns go
    # as chunks of 32 rows, in order.
    store = await Store.open(sqlite_url(tmp_path / "old.db"))
    try:
        store._sqlite_interactions = SqliteBatchInsert(
            INTERACTIONS, store.engine.dialect, max_variables=999
        )
        rows = [NewInteraction(device_id="dev_a", request_id=f"req_{i}", placeholders=[],
                               messages=[{"role": "user", "content": f"q{i}"}], status="ok",
                               fact_ids=["returns"]) for i in range(100)]  # fmt: skip
        await enrolled(store)
        await store.record_interactions(rows, [])
        async with store.engine.connect() as conn:
            got = (
                await conn.exec_driver_sql("SELECT request_id FROM interactions ORDER BY id")
            ).all()
        assert [r[0] for r in got] == [f"req_{i}" for i in range(100)]
        assert store._sqlite_interactions.chunk == 32
    finally:
        await store.close()


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is nine hours from UTC (a naive time must not be read as
    local time)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
async def test_times_are_stored_as_utc_instants_and_read_back_aware(store: Store) -> None:
    await enrolled(store)
    await store.record_interaction(
        NewInteraction(device_id="dev_a", request_id="req_1", placeholders=[],
                       messages=[{"role": "user", "content": "q"}], status="ok")
    )  # fmt: skip
    await store.add_feedback("dev_a", "idk_1", "req_1", "positive")
    [it] = await store.list_interactions()
    # The same instant asked three ways: aware in UTC, aware at +02:00, naive (taken as UTC).
    just_before = it.created_at - timedelta(seconds=1)
    ways = (
        just_before,
        just_before.astimezone(timezone(timedelta(hours=2))),
        just_before.replace(tzinfo=None),
    )
    for since in ways:
        assert [r.request_id for r in await store.list_interactions(rated_since=since)] == ["req_1"]
    later = it.created_at + timedelta(hours=1)
    assert await store.list_interactions(rated_since=later.replace(tzinfo=None)) == []


async def test_rated_interactions_are_found_by_when_their_feedback_came(store: Store) -> None:
    await enrolled(store)
    for i in range(3):
        await store.record_interaction(
            NewInteraction(device_id="dev_a", request_id=f"req_{i}", placeholders=[],
                           messages=[{"role": "user", "content": f"q{i}"}], status="ok")
        )  # fmt: skip
    await store.add_feedback("dev_a", "idk_0", "req_0", "negative", "Better answer.")
    start = datetime.now(UTC)
    await store.add_feedback("dev_a", "idk_2", "req_2", "positive")
    rated = await store.list_interactions(rated_only=True)
    assert [r.request_id for r in rated] == ["req_2", "req_0"]
    recent = await store.list_interactions(rated_since=start)
    assert [r.request_id for r in recent] == ["req_2"]
    [one] = await store.list_interactions(request_id="req_0")
    assert one.correction == "Better answer."
    wanted = [("dev_a", "req_0"), ("dev_a", "req_2"), ("dev_a", "req_9"), ("dev_b", "req_1")]
    found = await store.list_interactions(keys=wanted)
    assert [(r.request_id, r.rating) for r in found] == [
        ("req_2", "positive"),
        ("req_0", "negative"),
    ]


async def test_privacy_events_count_kinds_against_the_device(store: Store) -> None:
    await enrolled(store)
    await store.record_privacy_event("dev_a", "req_1", ["card", "email", "card"])
    device = await store.get_device("dev_a")
    assert device is not None and device.privacy_violations == 1
    assert await store.privacy_event_count() == 1
    async with store.engine.connect() as conn:
        kinds = (await conn.exec_driver_sql("SELECT kinds FROM privacy_events")).scalar_one()
    assert "card" in str(kinds) and "email" in str(kinds)


async def test_sessions_are_recorded_in_batches(store: Store) -> None:
    from datetime import UTC, datetime

    from cloud_agent.store import SessionEvent

    await enrolled(store)
    await enrolled(store, "dev_b", KEY_B)
    now = datetime.now(UTC)
    await store.record_interactions(
        [],
        [
            SessionEvent("started", "ses_1", "dev_a", now, server_id="cloud-1", adapter_version=2,
                         base_model_sha256="ab" * 32),
            SessionEvent("started", "ses_2", "dev_b", now, server_id="cloud-1"),
            SessionEvent("ended", "ses_1", "dev_a", now, close_code=1000),
        ],
    )  # fmt: skip
    device = await store.get_device("dev_a")
    assert device is not None and device.adapter_version == 2 and device.last_seen_at is not None
    async with store.engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT id, close_code FROM sessions ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("ses_1", 1000), ("ses_2", None)]


async def test_an_interaction_logged_again_under_its_request_id_replaces_the_first(
    store: Store,
) -> None:
    # A device may use a request id again once its request is over (a retry after `overloaded`,
    # say): the log keeps the last answer, within a batch and across batches, and the batch's
    # other rows go in with it.
    await enrolled(store)

    def asked(request_id: str, answer: str) -> NewInteraction:
        return NewInteraction(device_id="dev_a", request_id=request_id, placeholders=[],
                              messages=[{"role": "user", "content": "q"}], status="ok",
                              answer=answer)  # fmt: skip

    await store.record_interactions([asked("req_1", "first")], [])
    await store.record_interactions(
        [asked("req_1", "second"), asked("req_2", "other"), asked("req_2", "other, again")], []
    )
    rows = {r.request_id: r.answer for r in await store.list_interactions()}
    assert rows == {"req_1": "second", "req_2": "other, again"}


async def test_a_log_batch_on_a_locked_sqlite_file_is_a_typed_error_and_then_goes_in(
    tmp_path: Path,
) -> None:
    import sqlite3

    store = await Store.open(sqlite_url(tmp_path / "locked.db"), lock_timeout_s=0.2)
    try:
        await enrolled(store)
        batch = [NewInteraction(device_id="dev_a", request_id=f"req_{i}", placeholders=[],
                                messages=[{"role": "user", "content": "q"}], status="ok")
                 for i in range(3)]  # fmt: skip
        other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        with pytest.raises(StoreUnavailable):
            await store.record_interactions(batch, [])
        other.execute("ROLLBACK")
        other.close()
        await store.record_interactions(batch, [])
        assert sorted(r.request_id for r in await store.list_interactions()) == [
            "req_0",
            "req_1",
            "req_2",
        ]
    finally:
        await store.close()


async def test_an_unreachable_database_is_a_typed_error() -> None:
    with pytest.raises(StoreUnavailable):
        await Store.open("postgresql+asyncpg://nobody@127.0.0.1:1/none")


async def test_adapters_and_deployments_are_summarised(store: Store) -> None:
    from datetime import UTC, datetime

    from cloud_agent.store import tables as t

    await enrolled(store)
    async with store.engine.begin() as conn:
        await conn.execute(
            t.Adapter.__table__.insert(),
            [{"version": 3, "name": "facts", "base_model_sha256": "ab" * 32, "manifest": "{}",
              "signature": "s", "directory": "/x", "created_at": datetime.now(UTC),
              "metrics": {"fact_accuracy": 0.9}}],
        )  # fmt: skip
    assert await store.add_update_status("dev_a", "idk_1", 3, "applied", None, {"ok": 1.0}) is False
    [adapter] = await store.list_adapters()
    assert adapter["version"] == 3 and adapter["metrics"] == {"fact_accuracy": 0.9}
    assert await store.deployment_summary() == [{"version": 3, "devices": {"applied": 1}}]
    await enrolled(store, "dev_b", KEY_B)
    batch = [
        NewUpdateStatus("dev_a", "idk_1", 3, "applied", None, {}),  # a resend
        NewUpdateStatus("dev_b", "idk_1", 3, "applied", None, {"ok": 1.0}),
        NewUpdateStatus("dev_b", "idk_2", 3, "rolled_back", "self-check failed", {"ok": 0.0}),
        NewUpdateStatus("dev_b", "idk_3", 9, "rejected", "unknown version", {}),  # unpublished
        NewUpdateStatus("dev_b", "idk_2", 3, "applied", None, {}),  # the same key again
    ]
    flags = await store.add_update_status_batch(batch)
    assert list(flags.values()) == [True, False, False, False, True]
    # The device's latest status of a published version stands; unpublished ones only count.
    summary = await store.deployment_summary()
    assert summary == [{"version": 3, "devices": {"applied": 1, "rolled_back": 1}}]


async def publish(store: Store, tmp_path: Path, version: int, **kw: object) -> None:
    from cloud_agent.bundles import build_bundle
    from shared import SigningKey

    src = tmp_path / f"a{version}.bin"
    src.write_bytes(b"adapter %d" % version)
    offer = build_bundle(
        tmp_path / "bundles", name="facts", version=version, base_model_sha256="ab" * 32,
        files={"adapter.gguf": (src, "adapter")}, key=SigningKey.generate(),
    )  # fmt: skip
    await store.add_adapter(offer, directory=tmp_path / "bundles" / str(version), **kw)  # type: ignore[arg-type]


async def test_a_published_bundles_files_are_kept_in_the_store(
    store: Store, tmp_path: Path
) -> None:
    await publish(store, tmp_path, 4)
    blocks = [b async for b in store.bundle_blocks(4, "adapter.gguf")]
    assert b"".join(blocks) == b"adapter 4"
    assert [b async for b in store.bundle_blocks(4, "other.gguf")] == []
    assert [b async for b in store.bundle_blocks(5, "adapter.gguf")] == []


async def test_a_canary_rollout_offers_a_fixed_share_of_devices_then_everyone(
    store: Store, tmp_path: Path
) -> None:
    ids = await ten_enrolled(store)
    assert await store.next_adapter_version() == 1
    await publish(store, tmp_path, 1, canary_share=0.2)
    offered = [d for d in ids if await store.offer_for(d, "ab" * 32) is not None]
    assert len(offered) == 2
    assert [d for d in ids if await store.offer_for(d) is not None] == offered  # deterministic
    assert [d for d in ids if await store.offer_for(d, "cd" * 32)] == []  # another base model
    offers = await store.offers()  # one read, then every device's offer worked out from it
    assert [d for d in ids if offers.for_device(d, "ab" * 32)] == offered
    assert [d for d in ids if offers.for_device(d, "cd" * 32)] == []
    await store.add_update_status(offered[0], "k1", 1, "applied", None, {})
    await store.add_feedback(offered[0], "k2", "req_local", "negative", None, adapter_version=1)
    health = await store.rollout_health(1)
    assert health is not None
    assert (health.canary_size, health.canary_applied, health.feedback_negative) == (2, 1, 1)
    assert await store.set_rollout_state(1, "active", "canary applied")
    assert not await store.set_rollout_state(1, "active")  # nothing changed
    assert [d for d in ids if await store.offer_for(d)] == ids
    await store.set_rollout_state(1, "halted", "feedback")
    assert [d for d in ids if await store.offer_for(d)] == []
    record = await store.get_adapter(1)
    assert record is not None and record.files["adapter.gguf"][1] == len(b"adapter 1")


async def test_a_database_from_before_kept_cohorts_keeps_offering_its_canary(
    store: Store, tmp_path: Path
) -> None:
    from alembic import command

    from cloud_agent.store.store import _alembic_config

    ids = await ten_enrolled(store)
    await publish(store, tmp_path, 1, canary_share=0.2)
    offered = [d for d in ids if await store.offer_for(d)]

    def to_0003(connection: object) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0003")

    async with store.engine.begin() as conn:
        await conn.run_sync(to_0003)  # the schema before rollouts kept their cohort
    upgraded = await Store.open(store.engine.url.render_as_string(hide_password=False))
    try:
        assert len(offered) == 2
        assert [d for d in ids if await upgraded.offer_for(d)] == offered
    finally:
        await upgraded.close()


async def test_the_rollout_policy_promotes_halts_on_canary_failures_and_on_bad_feedback(
    store: Store, tmp_path: Path
) -> None:
    from cloud_agent.rollout import RolloutPolicy

    policy = RolloutPolicy(min_feedback=4, max_negative_share=0.5)
    for n in range(4):
        await enrolled(store, f"dev_{n}", chr(ord("A") + n) * 43)
    # Version 1: its canary device applies it, so it goes to everyone.
    await publish(store, tmp_path, 1, canary_share=0.25)
    [canary] = [d for d in (f"dev_{n}" for n in range(4)) if await store.offer_for(d)]
    assert await policy.review(store, 1) is None
    await store.add_update_status(canary, "k1", 1, "applied", None, {})
    assert await policy.review(store, 1) == "active"
    # Then its answers draw thumbs-down: three of four ratings negative halts it.
    for n, rating in enumerate(("negative", "positive", "negative", "negative")):
        await store.add_feedback(f"dev_{n}", f"f{n}", f"req_{n}", rating, adapter_version=1)
    assert await policy.review(store, 1) == "halted"
    assert (await store.get_adapter(1)).state == "halted"  # type: ignore[union-attr]
    # Version 2: its canary device rejects it; the rollout halts before anyone else gets it.
    await publish(store, tmp_path, 2, canary_share=0.25)
    [canary] = [d for d in (f"dev_{n}" for n in range(4)) if await store.offer_for(d)]
    await store.add_update_status(canary, "k2", 2, "rejected", "hash_mismatch", {})
    assert await policy.review(store, 2) == "halted"
    assert [d for d in (f"dev_{n}" for n in range(4)) if await store.offer_for(d)] == []


async def age(store: Store, table: Any, when: datetime, **where: str) -> None:
    """Move rows of `table` matching `where` back to `when` (as if written then)."""
    condition = [getattr(table, k) == v for k, v in where.items()]
    async with store.engine.begin() as conn:
        await conn.execute(update(table).where(*condition).values(created_at=when))


async def test_purge_deletes_what_is_older_than_the_cutoff_and_keeps_the_rest(
    store: Store,
) -> None:
    device = await enrolled(store)
    now = datetime.now(UTC)
    old = now - timedelta(days=40)
    await store.record_interactions(
        [NewInteraction(device_id=device, request_id=f"req_{name}", placeholders=[],
                        messages=[{"role": "user", "content": name}], status="ok")
         for name in ("old1", "old2", "old3", "new")],
        [SessionEvent("started", "ses_old", device, old),
         SessionEvent("ended", "ses_old", device, old),
         SessionEvent("started", "ses_open", device, old)],
    )  # fmt: skip
    for name in ("old1", "old2", "old3"):
        await age(store, tables.Interaction, old, request_id=f"req_{name}")
    await store.add_feedback(device, "idk_old", "req_old1", "negative", "wrong")
    await store.add_feedback(device, "idk_new", "req_new", "positive")
    await age(store, tables.Feedback, old, idempotency_key="idk_old")
    await store.add_report(report(device, "rep_old", local=2, reasons={"a.b": 1, "c.d": 1}))
    await store.add_report(report(device, "rep_new", local=1, reasons={"a.b": 1}))
    await age(store, tables.Report, old, idempotency_key="rep_old")
    await age(store, tables.ReportReason, old, idempotency_key="rep_old")
    await store.record_privacy_event(device, "req_old2", ["email"])
    await age(store, tables.PrivacyEvent, old, request_id="req_old2")
    await store.create_enrollment_token(ttl=timedelta(days=-35))  # expired long ago
    fresh = await store.create_enrollment_token()

    counts = await store.purge(now - timedelta(days=30), chunk=2)  # two chunks of interactions
    assert counts == {"interactions": 3, "feedback": 1, "report_reasons": 2, "reports": 1,
                      "privacy_events": 1, "sessions": 1, "enrollment_tokens": 1}  # fmt: skip
    assert [r.request_id for r in await store.list_interactions()] == ["req_new"]
    routing = await store.routing_summary(now - timedelta(days=1))
    assert (routing.reports, routing.routes.local, routing.reasons) == (1, 1, {"a.b": 1})
    summary = await store.feedback_summary()
    assert (summary.positive, summary.negative) == (1, 0)
    kept = await store.get_device(device)
    assert kept is not None and kept.privacy_violations == 1, "the device's count stays"
    await store.enroll_device(fresh, "dev_b", KEY_B)  # an unexpired token still works
    assert await store.purge(now - timedelta(days=30)) == dict.fromkeys(counts, 0)


async def test_forgetting_a_device_erases_its_records_and_leaves_a_revoked_tombstone(
    store: Store, tmp_path: Path
) -> None:
    gone, kept = await enrolled(store, "dev_a", KEY_A), await enrolled(store, "dev_b", KEY_B)
    when = datetime.now(UTC)
    await publish(store, tmp_path, 1)
    for device in (gone, kept):
        await store.record_interactions(
            [NewInteraction(device_id=device, request_id=f"req_{device}", placeholders=[],
                            messages=[{"role": "user", "content": "my order"}], status="ok")],
            [SessionEvent("started", f"ses_{device}", device, when)],
        )  # fmt: skip
        await store.add_feedback(device, f"idk_{device}", f"req_{device}", "negative", "no")
        await store.add_report(report(device, f"rep_{device}", local=1, reasons={"a.b": 1}))
        await store.add_update_status(device, f"st_{device}", 1, "applied", None, {})
        await store.record_privacy_event(device, f"req_{device}", ["email"])

    assert await store.forgotten_since(when) == []
    deleted = await store.forget_device(gone)
    assert await store.forgotten_since(when) == [gone], "found by replicas that did not hear"
    assert await store.revoked_since(when) == [gone]
    assert deleted == {"interactions": 1, "feedback": 1, "report_reasons": 1, "reports": 1,
                       "status_reports": 1, "deployments": 1, "privacy_events": 1,
                       "sessions": 1, "enrollment_tokens": 1}  # fmt: skip
    assert [r.device_id for r in await store.list_interactions()] == [kept]
    assert (await store.feedback_summary()).negative == 1
    tombstone = await store.get_device(gone)
    assert tombstone is not None and tombstone.revoked and tombstone.name is None
    assert tombstone.privacy_violations == 0
    other = await store.get_device(kept)
    assert other is not None and not other.revoked and other.privacy_violations == 1
    with pytest.raises(EnrollmentRefused):  # its key cannot come back under a new token
        await store.enroll_device(await store.create_enrollment_token(), "dev_c", KEY_A)
    assert await store.forget_device("dev_nobody") is None
    assert await store.forget_device(gone) == dict.fromkeys(deleted, 0)


async def test_interactions_page_back_by_id(store: Store) -> None:
    device = await enrolled(store)
    await store.record_interactions(
        [NewInteraction(device_id=device, request_id=f"req_{i}", placeholders=[],
                        messages=[{"role": "user", "content": f"q{i}"}], status="ok")
         for i in range(5)]
    )  # fmt: skip
    pages, before = [], None
    while page := await store.list_interactions(limit=2, before_id=before):
        pages.append([r.request_id for r in page])
        before = page[-1].id
    assert pages == [["req_4", "req_3"], ["req_2", "req_1"], ["req_0"]]


async def test_the_routing_summary_sums_the_reports_in_its_window_by_adapter_version(
    store: Store,
) -> None:
    a, b = await enrolled(store, "dev_a", KEY_A), await enrolled(store, "dev_b", KEY_B)
    now = datetime.now(UTC)
    await store.add_report_batch(
        [report(a, "r1", local=6, cloud=4, reasons={"difficulty.low": 6, "link.down": 1}),
         report(a, "r2", version=1, local=8, cloud=1, local_fallback=1,
                reasons={"coverage.match": 7, "link.down": 1}),
         report(b, "r3", version=1, local_only=2, cloud=2, reasons={"privacy.card": 2}),
         report(b, "old", ended=now - timedelta(days=2), cloud=50)]
    )  # fmt: skip
    # What the escalations cost the cloud, next to where requests went.
    await store.record_interactions(
        [NewInteraction(device_id=d, request_id=f"req_{d}", placeholders=[], status="ok",
                        messages=[{"role": "user", "content": "q"}], prompt_tokens=p,
                        completion_tokens=c)
         for d, p, c in ((a, 30, 12), (b, 5, 5))]
    )  # fmt: skip
    summary = await store.routing_summary(now - timedelta(hours=1))
    assert summary.cloud_tokens == 52
    assert (summary.reports, summary.devices) == (3, 2)
    assert summary.routes == RouteCounts(local=14, cloud=7, local_only=2, local_fallback=1)
    assert summary.routes.on_device_share == pytest.approx(17 / 24)
    assert summary.by_adapter_version == {
        None: RouteCounts(local=6, cloud=4),
        1: RouteCounts(local=8, cloud=3, local_only=2, local_fallback=1),
    }
    assert list(summary.reasons.items())[:2] == [("coverage.match", 7), ("difficulty.low", 6)]
    assert summary.reasons["link.down"] == 2
    # One device's; and a window holding the old report too.
    only_b = await store.routing_summary(now - timedelta(hours=1), device_id=b)
    assert only_b.routes == RouteCounts(cloud=2, local_only=2) and only_b.devices == 1
    assert only_b.cloud_tokens == 10
    wider = await store.routing_summary(now - timedelta(days=3))
    assert wider.reports == 4 and wider.routes.cloud == 57
    as_json = summary.as_dict()
    assert as_json["routes"]["total"] == 24 and as_json["cloud_tokens"] == 52
    assert [v["adapter_version"] for v in as_json["by_adapter_version"]] == [None, 1]
    # No reports: zeros, and no share to speak of.
    empty = await store.routing_summary(now + timedelta(days=1))
    assert (empty.reports, empty.routes.total, empty.routes.on_device_share) == (0, 0, None)
    assert empty.cloud_tokens == 0


async def test_reports_stored_before_the_routing_columns_are_summed_after_the_upgrade(
    store: Store,
) -> None:
    from alembic import command
    from sqlalchemy import JSON, String, column, table

    from cloud_agent.store.store import _alembic_config
    from cloud_agent.store.tables import UtcDateTime

    await enrolled(store)
    ended = datetime.now(UTC) - timedelta(minutes=1)
    body = {"period_start": (ended - timedelta(minutes=5)).isoformat(),
            "period_end": ended.isoformat(), "adapter_version": 2,
            "routes": {"local": 5, "cloud": 1, "local_only": 0, "local_fallback": 2},
            "reasons": {"coverage.match": 5}}  # fmt: skip
    old_reports = table(
        "reports", column("device_id", String), column("idempotency_key", String),
        column("body", JSON), column("created_at", UtcDateTime()),
    )  # fmt: skip

    def to_0006_with_a_report(connection: Any) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0006")
        connection.execute(
            old_reports.insert().values(
                device_id="dev_a", idempotency_key="k_old", body=body, created_at=ended
            )
        )

    async with store.engine.begin() as conn:
        await conn.run_sync(to_0006_with_a_report)
    upgraded = await Store.open(store.engine.url.render_as_string(hide_password=False))
    try:
        summary = await upgraded.routing_summary(ended - timedelta(minutes=1))
        assert summary.by_adapter_version == {2: RouteCounts(local=5, cloud=1, local_fallback=2)}
        assert summary.reasons == {"coverage.match": 5}
        assert (await upgraded.routing_summary(ended + timedelta(minutes=1))).reports == 0
    finally:
        await upgraded.close()


async def test_the_rollout_overview_shows_devices_and_where_the_adapter_answered(
    store: Store, tmp_path: Path
) -> None:
    from cloud_agent.rollout import rollouts

    a, b = await enrolled(store, "dev_a", KEY_A), await enrolled(store, "dev_b", KEY_B)
    await publish(store, tmp_path, 1)
    await publish(store, tmp_path, 2)
    await store.add_update_status(a, "k1", 1, "applied", None, {})
    await store.add_update_status(b, "k2", 1, "applied", None, {})
    await store.add_update_status(b, "k3", 2, "rejected", "self_check", {})
    await store.add_report_batch(
        [report(a, "r1", local=2, cloud=8), report(a, "r2", version=1, local=6, cloud=2),
         report(b, "r3", version=1, local=1, cloud=1),
         report(b, "old", version=1, cloud=9, ended=datetime.now(UTC) - timedelta(days=2))]
    )  # fmt: skip
    overview = {r["version"]: r for r in await rollouts(store)}
    assert list(overview) == [2, 1]
    assert overview[1]["devices"] == {"applied": 2} and overview[2]["devices"] == {"rejected": 1}
    assert overview[1]["routing"]["total"] == 10, "the last day's reports only"
    assert overview[1]["routing"]["on_device_share"] == pytest.approx(0.7)
    assert overview[2]["routing"] is None, "no device answers with version 2"
