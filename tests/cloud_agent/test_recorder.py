"""The interaction recorder: batches, waits for room, retries a failed batch once, then counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloud_agent.errors import StoreUnavailable
from cloud_agent.metrics import Metrics
from cloud_agent.recorder import InteractionRecorder
from cloud_agent.store import NewInteraction, SessionEvent, Store
from cloud_agent.store.store import sqlite_url


def interaction(i: int, device_id: str) -> NewInteraction:
    return NewInteraction(
        device_id=device_id,
        request_id=f"req_{i}",
        messages=[{"role": "user", "content": f"question {i}"}],
        placeholders=[],
        status="ok",
        answer=f"answer {i}",
    )


class FailingStore:
    """Test double: a store whose writes fail `failures` times, then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[tuple[int, int]] = []
        self.wrote = asyncio.Event()
        """Set when a batch has been written."""

    async def record_interactions(
        self, batch: list[NewInteraction], sessions: list[SessionEvent] | None = None
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("database unavailable: test")
        self.batches.append((len(batch), len(sessions or [])))
        self.wrote.set()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    yield store
    await store.close()


async def test_records_are_written_in_batches_and_flush_waits_for_them(store: Store) -> None:
    token = await store.create_enrollment_token()
    device = await store.enroll_device(token, "dev_rec", "A" * 43, "till")
    recorder = InteractionRecorder(store, max_batch=10, max_delay_s=0.05)
    recorder.start()
    for i in range(25):
        await recorder.record(interaction(i, device.id))
    await recorder.record(SessionEvent("started", "ses_1", device.id, datetime.now(UTC)))
    assert recorder.holds(device.id, "req_24") and not recorder.holds(device.id, "req_25")
    await recorder.flush()
    assert recorder.written == 26 and recorder.lost == 0
    assert not recorder.holds(device.id, "req_24"), "written: the store has it now"
    stored = await store.list_interactions(limit=100)
    assert sorted(r.request_id for r in stored) == sorted(f"req_{i}" for i in range(25))
    await recorder.stop()


class SlowStore:
    """Test double: a store whose writes wait until the test lets them finish."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.finish = asyncio.Event()

    async def record_interactions(
        self, batch: list[NewInteraction], sessions: list[SessionEvent] | None = None
    ) -> None:
        self.writing.set()
        await self.finish.wait()


async def test_a_batch_being_written_still_counts_as_pending() -> None:
    double = SlowStore()
    recorder = InteractionRecorder(double, max_batch=2, max_delay_s=10.0)  # type: ignore[arg-type]
    recorder.start()
    await recorder.record(interaction(0, "dev_1"))
    await recorder.record(interaction(1, "dev_1"))
    await recorder.record(interaction(2, "dev_1"))
    async with asyncio.timeout(5):
        await double.writing.wait()
    assert recorder.stats() == {"pending": 3, "written": 0, "lost": 0}, "2 writing, 1 waiting"
    double.finish.set()
    await recorder.stop()
    assert recorder.stats() == {"pending": 0, "written": 3, "lost": 0}


async def test_stop_writes_what_is_queued() -> None:
    double = FailingStore(failures=0)
    recorder = InteractionRecorder(double, max_batch=4, max_delay_s=10.0)  # type: ignore[arg-type]
    recorder.start()
    for i in range(6):
        await recorder.record(interaction(i, "dev_1"))
    await recorder.stop()
    assert sum(n for n, _ in double.batches) == 6 and recorder.written == 6
    assert max(n for n, _ in double.batches) <= 4


async def test_a_failed_batch_is_retried_once_then_counted_as_lost() -> None:
    double = FailingStore(failures=1)
    recorder = InteractionRecorder(double, max_delay_s=0.0, retry_delay_s=0.0)  # type: ignore[arg-type]
    recorder.start()
    await recorder.record(interaction(1, "dev_1"))
    assert recorder.holds("dev_1", "req_1")
    await recorder.flush()
    assert (recorder.written, recorder.lost) == (1, 0), "the retry succeeded"
    double.failures = 2
    await recorder.record(interaction(2, "dev_1"))
    await recorder.flush()
    assert (recorder.written, recorder.lost) == (1, 1)
    assert not recorder.holds("dev_1", "req_1") and not recorder.holds("dev_1", "req_2")
    await recorder.stop()


class BrokenStore(FailingStore):
    """Test double: its first write fails with a bug (not a database error)."""

    async def record_interactions(
        self, batch: list[NewInteraction], sessions: list[SessionEvent] | None = None
    ) -> None:
        if not self.batches and self.failures:
            self.failures = 0
            raise KeyError("a bug")
        await super().record_interactions(batch, sessions)


async def test_a_batch_failing_with_a_bug_is_counted_lost_and_the_recorder_goes_on() -> None:
    store = BrokenStore(failures=1)
    recorder = InteractionRecorder(store, max_batch=2, max_delay_s=0.01)  # type: ignore[arg-type]
    recorder.start()
    await recorder.record(interaction(1, "dev_1"))
    async with asyncio.timeout(5):
        await recorder.flush()
    await recorder.record(interaction(2, "dev_1"))
    async with asyncio.timeout(5):
        await recorder.flush()
    assert recorder.lost == 1 and recorder.written == 1 and store.batches == [(1, 0)]
    await recorder.stop()


async def test_a_full_queue_makes_record_wait_instead_of_growing() -> None:
    double = FailingStore(failures=0)
    recorder = InteractionRecorder(double, max_queue=3, max_delay_s=0.0)  # type: ignore[arg-type]
    for i in range(3):
        await recorder.record(interaction(i, "dev_1"))
    blocked = asyncio.create_task(recorder.record(interaction(3, "dev_1")))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "no room until the writer runs"
    recorder.start()
    await asyncio.wait_for(blocked, 5)
    await recorder.stop()
    assert recorder.written == 4


async def test_a_whole_batch_is_written_at_once_and_the_rest_waits_for_the_delay() -> None:
    double = FailingStore(failures=0)
    recorder = InteractionRecorder(double, max_batch=4, max_delay_s=60.0)  # type: ignore[arg-type]
    recorder.start()
    for i in range(5):
        await recorder.record(interaction(i, "dev_1"))
        await asyncio.sleep(0)  # the writer is waiting out the delay when the batch fills
    await asyncio.wait_for(double.wrote.wait(), 5)  # not 60 s: the batch was full
    assert double.batches == [(4, 0)] and recorder.holds("dev_1", "req_4")
    await recorder.stop()
    assert double.batches == [(4, 0), (1, 0)], "stopping writes the rest without waiting"


async def test_metrics_count_written_and_lost_records_and_show_the_waiting_ones() -> None:
    metrics = Metrics()
    double = FailingStore(failures=0)
    recorder = InteractionRecorder(double, max_delay_s=0.0, retry_delay_s=0.0, metrics=metrics)  # type: ignore[arg-type]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    await recorder.record(interaction(1, "dev_1"))
    await recorder.record(interaction(2, "dev_1"))
    assert sample("edgeloop_interaction_log_pending") == 2, "the writer has not started"
    recorder.start()
    await recorder.flush()
    double.failures = 2
    await recorder.record(interaction(3, "dev_1"))
    await recorder.flush()
    assert sample("edgeloop_interaction_log_records_total", outcome="written") == 2
    assert sample("edgeloop_interaction_log_records_total", outcome="lost") == 1
    assert sample("edgeloop_interaction_log_pending") == 0
    await recorder.stop()
