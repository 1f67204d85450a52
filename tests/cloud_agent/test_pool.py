"""BackendPool: least-loaded choice, failover, and taking failing members out of rotation."""

from __future__ import annotations

import asyncio

import pytest

from cloud_agent.backends import ChatRequest, ChatTurn, Completion, ScriptedBackend
from cloud_agent.backends.pool import BackendPool
from cloud_agent.errors import BackendResponseError, BackendUnavailable

REQUEST = ChatRequest(messages=(ChatTurn("user", "Hello"),))


async def test_requests_spread_over_members_by_load() -> None:
    a, b = (
        ScriptedBackend("a", name="a", delay_s=0.05),
        ScriptedBackend("b", name="b", delay_s=0.05),
    )
    pool = BackendPool([a, b])
    results = await asyncio.gather(*(pool.complete(REQUEST) for _ in range(4)))
    assert sorted(r.text for r in results) == ["a", "a", "b", "b"]
    assert all(r.backend == r.text for r in results), "each says which member answered"


async def test_a_failing_member_is_skipped_and_taken_out_of_rotation() -> None:
    bad = ScriptedBackend(name="bad", fail_with=BackendUnavailable("down"))
    good = ScriptedBackend("fine", name="good")
    pool = BackendPool([bad, good], max_failures=2, cooldown_s=60)
    for _ in range(4):
        assert (await pool.complete(REQUEST)).text == "fine"
    assert pool.healthy_count == 1
    calls_when_out = len(bad.calls)
    await pool.complete(REQUEST)
    assert len(bad.calls) == calls_when_out, "an unhealthy member gets no traffic"


async def test_an_unhealthy_member_is_readmitted_after_a_successful_probe() -> None:
    flaky = ScriptedBackend("back", name="flaky", fail_with=BackendUnavailable("down"))
    pool = BackendPool([flaky], max_failures=1, cooldown_s=0.0)
    with pytest.raises(BackendUnavailable):
        await pool.complete(REQUEST)
    assert pool.healthy_count == 0
    flaky.fail_with = None
    with pytest.raises(BackendUnavailable):
        await pool.complete(REQUEST)  # no member now; the probe starts in the background
    async with asyncio.timeout(2):
        while pool.healthy_count == 0:
            await asyncio.sleep(0.01)
    assert (await pool.complete(REQUEST)).text == "back"


async def test_non_retryable_errors_are_raised_without_failover() -> None:
    garbage = ScriptedBackend(name="g", fail_with=BackendResponseError("garbage"))
    other = ScriptedBackend("x", name="x")
    pool = BackendPool([garbage, other])
    with pytest.raises(BackendResponseError):
        for _ in range(2):
            await pool.complete(REQUEST)
    assert pool.healthy_count == 2


async def test_streams_fail_over_before_any_text() -> None:
    pool = BackendPool(
        [
            ScriptedBackend(name="bad", fail_with=BackendUnavailable("x")),
            ScriptedBackend("ok go", name="ok"),
        ]
    )
    items = [i async for i in pool.stream(REQUEST)]
    assert items[:2] == ["ok ", "go"]
    assert isinstance(items[-1], Completion) and items[-1].backend == "ok"


async def test_the_scripted_double_counts_calls_and_keeps_them_only_when_asked() -> None:
    kept, counted = ScriptedBackend("a"), ScriptedBackend("b", keep_calls=False)
    for backend in (kept, counted):
        await backend.complete(REQUEST)
        await backend.complete(REQUEST)
    assert kept.calls == [REQUEST, REQUEST] and kept.call_count == 2
    assert counted.calls == [] and counted.call_count == 2, "a benchmark's requests are not kept"
