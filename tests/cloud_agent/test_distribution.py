"""`BundleDistribution`: reviews after device reports, shared when reports arrive together."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from cloud_agent.distribution import BundleDistribution
from cloud_agent.metrics import Metrics
from cloud_agent.rollout import RolloutPolicy
from cloud_agent.store import Store
from cloud_agent.store.store import sqlite_url
from tests.cloud_agent.test_store import publish, ten_enrolled


@dataclass(frozen=True)
class CountingPolicy(RolloutPolicy):
    """The shipped policy, counting how often it reviews."""

    calls: list[int] | None = None

    async def review(self, store: Store, version: int) -> str | None:
        assert self.calls is not None
        self.calls.append(version)
        return await super().review(store, version)


async def test_reports_arriving_together_share_a_review_and_a_change_is_announced_once(
    tmp_path: Path,
) -> None:
    store = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    try:
        ids = await ten_enrolled(store)
        await publish(store, tmp_path, 1, canary_share=1.0)  # every device is in the canary
        calls: list[int] = []
        announced: list[bool] = []
        updates = BundleDistribution(
            store, Metrics(), max_chunk=4096, rollout_policy=CountingPolicy(calls=calls)
        )

        async def announce() -> None:
            announced.append(True)

        updates.on_rollout_change = announce
        for i, device in enumerate(ids):
            await store.add_update_status(device, f"k{i}", 1, "applied", None, {})
        await asyncio.gather(*(updates.review(1) for _ in ids))
        assert [r["state"] for r in await store.list_rollouts()] == ["active"]
        assert announced == [True]
        assert 1 <= len(calls) < len(ids)
    finally:
        await store.close()
