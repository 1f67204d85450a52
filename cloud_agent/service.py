"""`CloudService`: the whole cloud agent built from a `CloudConfig`, started and stopped as one.

It opens the store (migrating it), loads or creates the bundle-signing key, builds the backend
pool, scheduler, knowledge skill and agent, and serves the WebSocket endpoint and the admin
HTTP API (uvicorn) until `stop()`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn

from cloud_agent.admin import build_admin_app
from cloud_agent.agent import CloudAgent
from cloud_agent.autodistill import DistillTrigger
from cloud_agent.backends.base import LLMBackend
from cloud_agent.backends.pool import BackendPool
from cloud_agent.bundles import cluster_signing_key, key_rotations
from cloud_agent.cluster import Cluster
from cloud_agent.config import CloudConfig, EventLoopChoice
from cloud_agent.curator import Curator
from cloud_agent.errors import StoreError
from cloud_agent.jobs import JobRunner, distill_config
from cloud_agent.metrics import Metrics
from cloud_agent.rollout import PublicationFeed, RolloutPolicy, rollback
from cloud_agent.scheduler import Scheduler
from cloud_agent.server import CloudServer
from cloud_agent.store import FORGOTTEN, REVOCATIONS, Store
from protocol import KeyEndorsement, Limits
from shared.asgi import SignalFreeServer
from shared.errors import ConfigError
from shared.keys import SigningKey
from shared.net import cannot_listen, is_loopback, listen

__all__ = ["CloudService", "build_backend", "event_loop_factory", "settle_heap"]

log = logging.getLogger("edgeloop.cloud")


def settle_heap() -> None:
    """Put everything alive now out of the cyclic garbage collector's sight (`gc.freeze`).

    Once started, a cloud process holds a large heap that lives as long as it does: imported
    modules, pydantic schemas, SQLAlchemy metadata, the knowledge index. Every full collection
    walked all of it again, while a busy server triggers collections by allocating per
    request: 13 us of every escalation round trip in `bench.cloud_roundtrip`, 3 us once
    frozen. Unreachable cycles are collected first, so only live objects are frozen.

    The collector is process-wide: call this once, from the process's entry point (as
    `edgeloop cloud serve` does after start-up), not from a library."""
    gc.collect()
    gc.freeze()


def event_loop_factory(
    choice: EventLoopChoice = "auto",
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `edgeloop cloud serve` runs on (`CloudConfig.event_loop`), for
    `asyncio.Runner(loop_factory=...)`: uvloop's (libuv, written in C) when `choice` is
    "uvloop", or "auto" and uvloop is installed; None, asyncio's own, for "asyncio".

    Every escalation passes through the loop several times (socket reads and writes, the
    request's task, its deadline timer, the scheduler's future): on uvloop
    `bench.cloud_roundtrip` makes 1.1-1.3x the round trips a second at 0.8-0.9x the CPU time
    each (the websockets echo server it compares against gains as much). Raises `ConfigError`
    when "uvloop" is asked for and not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop", "uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    return uvloop.new_event_loop


def build_backend(config: CloudConfig) -> LLMBackend:
    """The configured backend, as a pool of `backend.replicas` instances (of each server, for
    an OpenAI-compatible backend given several)."""
    cfg = config.backend
    members: list[LLMBackend] = []
    for _ in range(cfg.replicas):
        if cfg.kind == "openai":
            from cloud_agent.backends.openai import OpenAICompatibleBackend

            assert cfg.base_url is not None and cfg.model is not None
            members += (
                OpenAICompatibleBackend(
                    url, cfg.model, api_key=cfg.api_key, timeout_s=cfg.timeout_s
                )
                for url in cfg.base_url
            )
        else:
            from cloud_agent.backends.llama_cpp import LlamaCppBackend

            members.append(
                LlamaCppBackend(
                    cfg.model_path,
                    n_ctx=cfg.n_ctx,
                    n_threads=cfg.threads,
                    stop_repetition=cfg.stop_repetition,
                )
            )
    return BackendPool(members)


class CloudService:
    """Everything `edgeloop cloud serve` runs."""

    def __init__(
        self,
        config: CloudConfig,
        *,
        store: Store,
        backend: LLMBackend,
        signing_key: SigningKey,
        admin_token: str,
        key_rotations: tuple[KeyEndorsement, ...] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.signing_key = signing_key
        self.admin_token = admin_token
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.capacity)
        self.agent = CloudAgent(backend, self.scheduler, phone_regions=self.config.phone_regions)
        self.cluster = Cluster(config.resolved_database_url(), metrics=self.metrics)
        """Notices between replicas (PostgreSQL): rollouts, revocations, erasures, sessions,
        knowledge reloads."""
        self.curator = Curator(
            config, store=store, agent=self.agent, metrics=self.metrics, cluster=self.cluster
        )
        """Keeps the knowledge index current: feedback, file reloads, forgotten devices."""
        self.jobs = JobRunner(
            store, self.agent, workers=config.capacity, distiller=self._distill_job
        )
        limits = Limits(
            max_message_bytes=config.limits.max_message_bytes,
            max_in_flight=config.limits.max_in_flight,
            max_requests_per_minute=config.limits.max_requests_per_minute,
            heartbeat_s=config.limits.heartbeat_s,
        )
        self.bundles_dir = config.data_dir / "bundles"
        self.server = CloudServer(
            store=store,
            agent=self.agent,
            signing_key=signing_key,
            server_id=config.server_id,
            limits=limits,
            metrics=self.metrics,
            max_queue=config.limits.max_queue,
            auth_timeout_s=config.limits.auth_timeout_s,
            max_tokens=config.limits.max_tokens,
            ssl_context=_ssl_context(config),
            rollout_policy=RolloutPolicy(
                max_canary_failures=config.rollout.max_canary_failures,
                min_feedback=config.rollout.min_feedback,
                max_negative_share=config.rollout.max_negative_share,
            ),
            bundles_dir=self.bundles_dir,
            cluster=self.cluster,
            key_rotations=key_rotations,
        )
        self.feed = PublicationFeed(
            store, self.server.push_offers, cluster=self.cluster, poll_s=config.rollout.poll_s
        )
        self.cluster.subscribe(REVOCATIONS, self._revoked_elsewhere)
        self.cluster.subscribe(FORGOTTEN, self._unlearn)
        self.server.updates.on_rollout_change = self.feed.announce
        self.port: int | None = None
        self.admin_port: int | None = None
        self.draining = False
        self._uvicorn: uvicorn.Server | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self._unlearned: dict[str, float] = {}
        """Erased devices whose feedback was unlearned lately (monotonic time): `_unlearn`
        runs once per device."""
        self._background: list[asyncio.Task[None]] = []
        """What runs on a timer (purge, learning from other replicas, distilling when due)."""

    @classmethod
    async def create(
        cls, config: CloudConfig, *, backend: LLMBackend | None = None
    ) -> CloudService:
        """Build the service from `config`; `backend` replaces the configured one (tests)."""
        config.data_dir.mkdir(parents=True, exist_ok=True)
        admin_token = config.admin_token or _load_or_create_token(config.data_dir / "admin.token")
        store = await Store.open(
            config.resolved_database_url(), lock_timeout_s=config.store_lock_timeout_s
        )
        chosen: LLMBackend | None = backend
        try:
            signing_key = await cluster_signing_key(config.data_dir, store)
            rotations = await key_rotations(store)
            if chosen is None:
                chosen = await asyncio.to_thread(build_backend, config)
            return cls(
                config, store=store, backend=chosen, signing_key=signing_key,
                admin_token=admin_token, key_rotations=rotations,
            )  # fmt: skip
        except BaseException:
            # Nothing is left open by a service that could not be built (a bad knowledge
            # file, certificate or key).
            if chosen is not None and backend is None:
                await chosen.aclose()
            await store.close()
            raise

    async def start(self) -> None:
        """Start serving; if any part cannot start (a port in use), what did start is stopped
        and the store closed before the error is raised (`ConfigError` for a port)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        if (days := self.config.retention_days) is not None:
            await self._purge(days)
            self._background.append(asyncio.create_task(self._purge_hourly(days)))
        await self.curator.learn_from_store()
        if self.agent.skill is not None:
            self._background.append(asyncio.create_task(self.curator.follow_replicas()))
        if (due := self.config.auto_distill).after_examples is not None:
            trigger = DistillTrigger(
                self.store, after_examples=due.after_examples, params=due.params
            )
            self._background.append(asyncio.create_task(self._distill_when_due(trigger)))
        self._background.append(asyncio.create_task(self._follow_revocations()))
        self.server.recorder.start()
        host, port = self.config.host, self.config.port
        try:
            self.port = await self.server.start(host, port)
        except OSError as exc:
            raise cannot_listen("port", host, port, exc) from exc
        await self.cluster.start()
        await self.feed.start()
        self.jobs.start()
        app = build_admin_app(self)
        # With a certificate, the admin API is HTTPS on it too: its bearer token does not
        # cross the network in clear.
        tls = self.server.ssl_context is not None
        uv_config = uvicorn.Config(
            app,
            host=self.config.admin_host,
            port=self.config.admin_port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=str(self.config.tls_cert) if tls else None,
            ssl_keyfile=str(self.config.tls_key) if tls else None,
        )
        # The service handles SIGINT and SIGTERM itself (`edgeloop cloud serve`).
        self._uvicorn = SignalFreeServer(uv_config)
        # Bound here rather than by uvicorn, which exits the process when it cannot bind.
        admin_socket = listen(self.config.admin_host, self.config.admin_port, key="admin_port")
        self._admin_task = asyncio.create_task(self._uvicorn.serve(sockets=[admin_socket]))
        async with asyncio.timeout(10):
            while not self._uvicorn.started:
                if self._admin_task.done():
                    await self._admin_task
                    raise RuntimeError("admin server stopped during start-up")
                await asyncio.sleep(0.01)
        servers = self._uvicorn.servers
        self.admin_port = int(servers[0].sockets[0].getsockname()[1]) if servers else None
        log.info(
            "cloud agent %s serving %s (admin %s)",
            self.config.server_id, self.url, self.admin_url,
        )  # fmt: skip
        for warning in exposure_warnings(self.config):
            log.warning("%s", warning)

    @property
    def url(self) -> str:
        """The WebSocket endpoint, once started (wss:// with a certificate)."""
        scheme = "wss" if self.server.ssl_context else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/v1"

    @property
    def admin_url(self) -> str:
        """The admin API, once started (https:// with a certificate)."""
        scheme = "https" if self.server.ssl_context else "http"
        return f"{scheme}://{self.config.admin_host}:{self.admin_port}"

    async def revoke(self, device_id: str) -> bool:
        """Revoke a device and end its session at once, on this replica and (told through
        PostgreSQL) on any other. False if it was already revoked."""
        changed = await self.store.revoke_device(device_id)
        await self.server.end_sessions([device_id])
        return changed

    async def forget(self, device_id: str) -> dict[str, int] | None:
        """Erase a device's data from the store (`Store.forget_device`): revoked first, its
        session on this replica ended and what it logged written, so nothing of it lands after
        the erasure; then the knowledge index unlearns what its feedback taught (on every
        replica, with PostgreSQL). None for an unknown device."""
        if await self.store.get_device(device_id) is None:
            return None
        await self.revoke(device_id)
        await self.server.recorder.flush()
        deleted = await self.store.forget_device(device_id)
        await self._unlearn(device_id)  # here at once; the store's notice, for the others
        return deleted

    async def _unlearn(self, device_id: str) -> None:
        """What the forgotten device's feedback taught the knowledge index goes: once per
        device, though the notice and the poll may both bring it."""
        if device_id in self._unlearned:
            return
        self._unlearned[device_id] = time.monotonic()
        try:
            await self.curator.unlearn()
        except StoreError as exc:
            del self._unlearned[device_id]  # the next poll tries again
            log.warning("knowledge: not learned again without %s (%s)", device_id, exc)

    async def _revoked_elsewhere(self, device_id: str) -> None:
        await self.server.end_sessions([device_id])

    async def _follow_revocations(self) -> None:
        """Devices revoked or erased elsewhere (the CLI, another replica) are read every
        `revocation_poll_s`, for a notice that did not come (SQLite, a lost connection): their
        sessions end, and erased devices are unlearned. The windows overlap by a minute, as
        for feedback."""
        checked = datetime.now(UTC)
        while True:
            await asyncio.sleep(self.config.revocation_poll_s)
            now, since = datetime.now(UTC), checked - timedelta(minutes=1)
            try:
                revoked = await self.store.revoked_since(since)
                forgotten = await self.store.forgotten_since(since)
            except StoreError as exc:
                log.warning("revocations not read (%s); trying again", exc)
                continue
            checked = now
            if revoked:
                await self.server.end_sessions(revoked)
            for device_id in forgotten:
                await self._unlearn(device_id)
            # An erasure is read again only within the overlap: forget it after twice that.
            stale = time.monotonic() - 120
            for device_id in [d for d, at in self._unlearned.items() if at < stale]:
                del self._unlearned[device_id]

    async def _purge(self, days: float) -> None:
        """Apply the retention policy once: delete what is older than `days`."""
        counts = await self.store.purge(datetime.now(UTC) - timedelta(days=days))
        for table, rows in counts.items():
            self.metrics.purged.labels(table).inc(rows)
        if any(counts.values()):
            log.info("retention: deleted %s", counts)

    async def _purge_hourly(self, days: float) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await self._purge(days)
            except StoreError as exc:
                log.warning("retention: purge failed (%s); trying again in an hour", exc)

    async def _distill_when_due(self, trigger: DistillTrigger) -> None:
        while True:
            try:
                await trigger.check()
            except StoreError as exc:
                log.warning("auto distill: could not check (%s); trying again later", exc)
            await asyncio.sleep(self.config.auto_distill.check_s)

    async def stop(self) -> None:
        """Graceful: stop accepting, drain in-flight work, close everything."""
        self.draining = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        await self.feed.stop()
        await self.cluster.stop()
        await self.server.shutdown(self.config.shutdown_grace_s)
        await self.jobs.stop()
        await self.server.recorder.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._admin_task is not None:
            await self._admin_task
        await self.backend.aclose()
        await self.store.close()

    async def _distill_job(self, params: dict[str, Any]) -> dict[str, Any]:
        """A `distill` job: one cycle with `params` over this cloud's store and key."""
        from cloud_agent.distill import distill
        from cloud_agent.distill.dataset import expectations_from_workload

        labels = params.get("labels")
        config = distill_config(
            params,
            expectations=expectations_from_workload(Path(labels)) if labels else {},
            canary_share=self.config.rollout.canary_share,
            phone_regions=self.config.phone_regions,
        )
        result = await distill(
            self.store,
            config=config,
            work_dir=self.config.data_dir / "distill",
            bundles_dir=self.bundles_dir,
            signing_key=await self._current_signing_key(),
        )
        if result.published:
            await self.published()
        return {
            "published": result.published,
            "version": result.version,
            "reason": result.reason,
            "metrics": result.metrics,
        }

    async def _current_signing_key(self) -> SigningKey:
        """The key to sign a bundle with now: `server.key` read again, so a key rotated while
        this replica runs is refused (`ConfigError`), or taken up once its file is copied here,
        rather than signing what devices that moved to the new key would reject."""
        key = await cluster_signing_key(self.config.data_dir, self.store)
        if key.verify_key() != self.signing_key.verify_key():
            # Rotated while serving: enrollments hand out the new key, welcomes tell the chain.
            self.server.signing_key = key
            self.server.key_rotations = await key_rotations(self.store)
        self.signing_key = key
        return key

    async def published(self) -> None:
        """A bundle was published (by `distill` or a rollback): offer it everywhere."""
        await self.feed.announce()

    async def rollback(self, version: int) -> int:
        """Operator rollback of `version`; returns the new version that undoes it."""
        new_version = await rollback(
            self.store,
            version,
            signing_key=await self._current_signing_key(),
            bundles_dir=self.bundles_dir,
        )
        await self.published()
        return new_version

    def refresh_gauges(self) -> None:
        load = self.scheduler.load()
        self.metrics.in_flight.labels("online").set(load.online_in_flight)
        self.metrics.in_flight.labels("offline").set(load.offline_in_flight)
        self.metrics.queued.labels("online").set(load.online_queued)
        self.metrics.queued.labels("offline").set(load.offline_queued)
        self.metrics.service_seconds.set(load.service_s)
        self.metrics.wait_seconds.set(load.online_wait_s)
        self.metrics.cluster_listening.set(int(self.cluster.listening))

    def backend_health(self) -> list[dict[str, Any]]:
        if isinstance(self.backend, BackendPool):
            return [
                {
                    "name": m.backend.name,
                    "healthy": m.healthy,
                    "in_flight": m.in_flight,
                    "served": m.served,
                    "latency_s": round(m.latency_ewma_s, 4),
                }
                for m in self.backend.members
            ]
        return [{"name": self.backend.name}]


def exposure_warnings(config: CloudConfig) -> list[str]:
    """What the service exposes in clear beyond this machine: without a certificate, devices'
    requests on a WebSocket endpoint bound beyond the loopback, and the admin API's token."""
    if config.tls_cert is not None:
        return []
    fix = "give the service a certificate (tls_cert and tls_key)"
    return [
        *([f"devices' requests reach {config.host} unencrypted (ws://): {fix}"]
          if not is_loopback(config.host) else []),
        *([f"the admin API's token reaches {config.admin_host} unencrypted (http://): {fix}"]
          if not is_loopback(config.admin_host) else []),
    ]  # fmt: skip


def _ssl_context(config: CloudConfig) -> ssl.SSLContext | None:
    """The server's TLS context (wss:// and https://), or None without a certificate. A file
    that is missing, or a certificate and key that cannot be loaded together, is a
    `ConfigError` naming the key."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    for key, path in (("tls_cert", config.tls_cert), ("tls_key", config.tls_key)):
        if not path.is_file():
            raise ConfigError(key, f"{path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "tls_cert",
            f"cannot load {config.tls_cert} with the key {config.tls_key} (a PEM certificate "
            f"and its own private key expected): {exc}",
        ) from None
    return context


def _load_or_create_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token
