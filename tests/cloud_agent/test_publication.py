"""`PublicationFeed`: rollout changes reach `on_change`, and a push that failed is not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_agent.cluster import Cluster
from cloud_agent.errors import StoreUnavailable
from cloud_agent.rollout import PublicationFeed
from cloud_agent.store import Store
from cloud_agent.store.store import sqlite_url
from tests.cloud_agent.test_store import publish


async def test_a_push_that_failed_is_tried_again_by_the_next_poll(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cloud.db")
    store = await Store.open(url)
    pushes: list[bool] = []

    async def on_change() -> None:
        pushes.append(True)
        if len(pushes) == 1:
            raise StoreUnavailable("database unavailable: OperationalError")

    feed = PublicationFeed(store, on_change, cluster=Cluster(url), poll_s=0.02)
    await feed.start()
    try:
        await publish(store, tmp_path, 1)
        async with asyncio.timeout(5):
            while len(pushes) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # and once pushed, the same change is not pushed again
        assert len(pushes) == 2
    finally:
        await feed.stop()
        await store.close()
