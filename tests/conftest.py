"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud_agent.service import event_loop_factory
from shared.log import QUIETED_LOGGERS

# The real cloud service fixture (`cloud`) serves the cloud, edge and end-to-end tests alike.
pytest_plugins = ["tests.cloud_fixtures"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on asyncio's own loop; those marked `every_event_loop` run once more on
    uvloop's, the loop `edgeloop cloud serve` takes when it is installed."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.get_closest_marker("every_event_loop") is not None:
        if (uvloop := event_loop_factory("auto")) is not None:
            factories["uvloop"] = uvloop
    return factories


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PG_HOST = os.environ.get("EDGELOOP_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("EDGELOOP_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("EDGELOOP_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("EDGELOOP_TEST_PG_DB", "test")


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    import socket

    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            return None
    except OSError as exc:
        return f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} ({exc.strerror or exc})"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped afterwards.

    Skips, saying so, when no server answers on 127.0.0.1:5432 (CI always has one).
    """
    reason = _pg_reachable()
    if reason is not None:
        pytest.skip(f"SKIPPED PostgreSQL backend: {reason}")
    import asyncio

    import asyncpg

    name = f"edgeloop_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:
        # In a thread of its own: the fixture may be requested from inside a running loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin(sql)).result()

    run(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """`postgres_url`, emptied after the test (every table dropped), whatever the test left
    running or failed to do: the next test starts on an empty database."""
    yield postgres_url

    async def drop() -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        from cloud_agent.store.tables import Base

        engine = create_async_engine(postgres_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        finally:
            await engine.dispose()

    # In a thread of its own, as `postgres_url` does: a test's loop may still be running.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, drop()).result()


def _shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the suite needs ../shared/data beside the repository")
    return path


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """CLI tests run `main` in-process, and `configure_logging` points the root logger at the
    test's captured stderr, which is closed once the test ends: put logging back as it was, so
    later tests do not log into a closed stream ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in QUIETED_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quieted.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture
def kb_path() -> Path:
    return _shared_file("northwind-kb.md")


@pytest.fixture
def workload_path() -> Path:
    return _shared_file("northwind-workload-dev.jsonl")
