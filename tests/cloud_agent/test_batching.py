"""`Batcher`: concurrent calls share batches, and none is answered by a batch older than it."""

from __future__ import annotations

import asyncio

import pytest

from cloud_agent.batching import Batcher


class Table:
    """A fetch function over a dict that records each query's keys and can be held open."""

    def __init__(self, rows: dict[str, int]) -> None:
        self.rows = rows
        self.queries: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on: str | None = None

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.queries.append(keys)
        await self.gate.wait()
        if self.fail_on in keys:
            raise LookupError("store down")
        return {k: self.rows[k] for k in keys if k in self.rows}


async def held(table: Table, lookup: Batcher[str, int], key: str) -> asyncio.Task[int | None]:
    """Submit `key` with the table's gate closed; returns once its query runs, held there."""
    table.gate.clear()
    started = len(table.queries)
    task = asyncio.create_task(lookup.submit(key))
    async with asyncio.timeout(5):
        while len(table.queries) == started:
            await asyncio.sleep(0)
    return task


async def test_lookups_made_while_a_query_runs_share_the_next_query() -> None:
    table = Table({"a": 1, "b": 2, "c": 3, "d": 4})
    lookup = Batcher(table.fetch)
    first = await held(table, lookup, "a")
    rest = [asyncio.create_task(lookup.submit(k)) for k in ("b", "c", "d", "b")]
    await asyncio.sleep(0)
    table.gate.set()
    assert await first == 1
    assert await asyncio.gather(*rest) == [2, 3, 4, 2]
    assert table.queries == [["a"], ["b", "c", "d"]]
    assert lookup.batches == 2


async def test_a_lookup_is_answered_by_a_query_that_started_after_it_asked() -> None:
    table = Table({"dev": 1})
    lookup = Batcher(table.fetch)
    early = await held(table, lookup, "dev")
    table.rows["dev"] = 2  # changed while the first query runs (say, the device was revoked)
    late = asyncio.create_task(lookup.submit("dev"))
    await asyncio.sleep(0)
    table.gate.set()
    # The first query read before the change here; a real one may see either. The late caller
    # must not share it: it asked after the first query started.
    assert await late == 2
    await early
    assert len(table.queries) == 2


async def test_a_key_nobody_has_is_none() -> None:
    lookup = Batcher(Table({"a": 1}).fetch)
    assert await lookup.submit("zzz") is None


async def test_batches_hold_at_most_max_batch_keys() -> None:
    table = Table({k: i for i, k in enumerate("abcdefg")})
    sizes: list[int] = []
    lookup = Batcher(table.fetch, max_batch=3, observe=sizes.append)
    got = await asyncio.gather(*(lookup.submit(k) for k in "abcdefg"))
    assert got == list(range(7))
    assert [len(q) for q in table.queries] == sizes == [3, 3, 1]
    with pytest.raises(ValueError):
        Batcher(table.fetch, max_batch=0)


async def test_a_failed_query_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    table = Table({"a": 1, "bad": 2})
    table.fail_on = "bad"
    lookup = Batcher(table.fetch)
    results = await asyncio.gather(lookup.submit("a"), lookup.submit("bad"), return_exceptions=True)
    assert [type(r) for r in results] == [LookupError, LookupError]
    table.fail_on = None
    assert await lookup.submit("a") == 1


async def test_a_caller_that_gives_up_does_not_cancel_the_query_the_others_wait_for() -> None:
    table = Table({"a": 1, "b": 2})
    lookup = Batcher(table.fetch)
    table.gate.clear()
    quitter = asyncio.create_task(lookup.submit("a"))
    stayer = asyncio.create_task(lookup.submit("b"))
    async with asyncio.timeout(5):
        while not table.queries:  # both in the first batch, held at the gate
            await asyncio.sleep(0)
    quitter.cancel()
    await asyncio.sleep(0)
    table.gate.set()
    assert await stayer == 2
    assert quitter.cancelled()


async def test_drain_waits_for_a_batch_nobody_waits_for_any_more() -> None:
    table = Table({"a": 1})
    lookup = Batcher(table.fetch)
    caller = await held(table, lookup, "a")
    caller.cancel()
    draining = asyncio.create_task(lookup.drain())
    await asyncio.sleep(0.01)
    assert not draining.done(), "the query is still held at the gate"
    table.gate.set()
    await asyncio.wait_for(draining, 5)
    assert table.queries == [["a"]]
    await lookup.drain()  # nothing left: returns at once
