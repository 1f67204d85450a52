"""The scheduler: online first by deadline, offline in the gaps, refusal instead of queueing."""

from __future__ import annotations

import asyncio

import pytest

from cloud_agent.errors import Overloaded
from cloud_agent.scheduler import Scheduler


async def hold(scheduler: Scheduler, lane: str, seconds: float, log: list[str], name: str,
               deadline_in: float = 10.0) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    async with scheduler.slot(
        lane, deadline=loop.time() + deadline_in if lane == "online" else None
    ):  # type: ignore[arg-type]
        log.append(name)
        await asyncio.sleep(seconds)


def make(capacity: int, **kw: object) -> Scheduler:
    return Scheduler(capacity, clock=lambda: asyncio.get_running_loop().time(), **kw)  # type: ignore[arg-type]


async def test_online_work_starts_before_queued_offline_work() -> None:
    scheduler, log = make(1), []
    first = asyncio.create_task(hold(scheduler, "offline", 0.05, log, "off-1"))
    await asyncio.sleep(0)
    queued_offline = asyncio.create_task(hold(scheduler, "offline", 0.01, log, "off-2"))
    await asyncio.sleep(0)
    online = asyncio.create_task(hold(scheduler, "online", 0.01, log, "on-1"))
    await asyncio.gather(first, queued_offline, online)
    assert log == ["off-1", "on-1", "off-2"]


async def test_online_requests_are_served_earliest_deadline_first() -> None:
    scheduler, log = make(1), []
    blocker = asyncio.create_task(hold(scheduler, "online", 0.05, log, "blocker"))
    await asyncio.sleep(0)
    late = asyncio.create_task(hold(scheduler, "online", 0.0, log, "late", deadline_in=5))
    early = asyncio.create_task(hold(scheduler, "online", 0.0, log, "early", deadline_in=2))
    await asyncio.gather(blocker, late, early)
    assert log == ["blocker", "early", "late"]


async def test_offline_work_leaves_the_reserve_free_for_online_arrivals() -> None:
    scheduler, log = make(4, reserve=2), []
    jobs = [
        asyncio.create_task(hold(scheduler, "offline", 0.05, log, f"off-{i}")) for i in range(6)
    ]
    await asyncio.sleep(0.01)
    assert scheduler.load().offline_in_flight == 2
    await hold(scheduler, "online", 0.0, log, "on")
    assert scheduler.load().online_wait_s == 0.0, "the online request found a free slot"
    await asyncio.gather(*jobs)
    assert sorted(log) == sorted(["on", *(f"off-{i}" for i in range(6))]), "nothing dropped"


async def test_offline_pauses_while_online_work_queues_then_resumes() -> None:
    scheduler, log = make(1), []
    online = [
        asyncio.create_task(hold(scheduler, "online", 0.02, log, f"on-{i}")) for i in range(3)
    ]
    await asyncio.sleep(0)
    offline = asyncio.create_task(hold(scheduler, "offline", 0.0, log, "off"))
    await asyncio.gather(*online, offline)
    assert log == ["on-0", "on-1", "on-2", "off"]


async def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once() -> None:
    scheduler, log = make(1), []
    await hold(scheduler, "online", 0.05, log, "teach")  # service time is now ~0.05 s
    busy = asyncio.create_task(hold(scheduler, "online", 0.05, log, "busy"))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Overloaded):
        async with scheduler.slot("online", deadline=loop.time() + 0.02):
            pass
    assert loop.time() - started < 0.01, "refused without queueing"
    assert scheduler.load().refused == 1
    await busy


async def test_a_queued_request_gives_up_when_its_deadline_can_no_longer_be_met() -> None:
    scheduler, log = make(1), []
    blocker = asyncio.create_task(hold(scheduler, "online", 0.2, log, "blocker"))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    with pytest.raises(Overloaded):
        async with scheduler.slot("online", deadline=loop.time() + 0.05):
            pass
    await blocker
    assert scheduler.load().online_in_flight == 0 and scheduler.load().online_queued == 0


async def test_cancelled_waiters_release_nothing_they_did_not_hold() -> None:
    scheduler, log = make(1), []
    blocker = asyncio.create_task(hold(scheduler, "online", 0.05, log, "blocker"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(scheduler, "offline", 0.0, log, "never"))
    await asyncio.sleep(0)
    waiter.cancel()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await waiter
    load = scheduler.load()
    assert (load.online_in_flight, load.offline_in_flight, load.offline_queued) == (0, 0, 0)


async def test_a_scheduler_with_online_work_only_keeps_no_more_arrivals_than_its_window() -> None:
    # The arrivals measure online demand over the window; with no offline work to ask for the
    # demand they were never trimmed, and a busy cloud kept one float per request forever.
    now = [0.0]
    scheduler = Scheduler(4, window_s=5.0, clock=lambda: now[0])
    for _ in range(10_000):
        now[0] += 0.01
        async with scheduler.slot("online", deadline=now[0] + 10):
            pass
    assert len(scheduler._arrivals) <= 501
    assert scheduler.online_demand() == pytest.approx(0.0)
