"""`edgeloop cloud ...`: run the cloud agent and manage its devices."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloud_agent.config import EVENT_LOOPS, CloudConfig
from shared.config import load_config

__all__ = ["register"]

ENV_PREFIX = "EDGELOOP_CLOUD__"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("cloud", help="the cloud agent service")
    sub = parser.add_subparsers(title="cloud commands", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, help=f"TOML file; environment variables {ENV_PREFIX}* win"
        )
        p.add_argument("--data-dir", type=Path, help="directory of the database and keys")
        p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in --data-dir)")

    serve = sub.add_parser("serve", help="serve devices over WebSockets, plus the admin API")
    common(serve)
    serve.add_argument("--host", help="WebSocket bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="WebSocket port (default 8765, 0 = any)")
    serve.add_argument("--admin-port", type=int, help="admin HTTP port (default 8766, 0 = any)")
    serve.add_argument(
        "--knowledge",
        type=Path,
        help="knowledge file (Markdown or JSONL); SIGHUP reads it again while serving",
    )
    serve.add_argument("--model", type=Path, help="GGUF model for the embedded backend")
    serve.add_argument(
        "--tls-cert",
        type=Path,
        help="PEM certificate (serves wss://, and the admin API over https://)",
    )
    serve.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    serve.add_argument(
        "--loop", choices=EVENT_LOOPS, help="event loop (default auto: uvloop when installed)"
    )
    serve.set_defaults(func=_serve)

    token = sub.add_parser("enroll-token", help="issue a one-time enrollment token")
    common(token)
    token.add_argument(
        "--ttl-hours", type=_ttl_hours, default=168.0, help="validity, up to a year (default 168)"
    )
    token.add_argument("--note", type=_note, help="a short text kept with the token")
    token.set_defaults(func=_enroll_token)

    devices = sub.add_parser("devices", help="list enrolled devices as JSON")
    common(devices)
    devices.set_defaults(func=_devices)

    interactions = sub.add_parser(
        "interactions",
        help="list escalations the cloud answered as JSON, newest first: the redacted "
        "conversation, the answer, the route reasons, tokens, facts and the feedback on it",
    )
    common(interactions)
    interactions.add_argument(
        "--limit", type=_page_size, default=20, help="how many (default 20, up to 1000)"
    )
    interactions.add_argument("--device", help="one device's only")
    interactions.add_argument(
        "--status", type=_status, help="how they ended: ok, error or cancelled"
    )
    interactions.add_argument(
        "--before", type=int, metavar="ID", help="older than this id (the next page)"
    )
    interactions.set_defaults(func=_interactions)

    jobs = sub.add_parser("jobs", help="offline jobs: submit, list, show")
    jobs_sub = jobs.add_subparsers(title="jobs commands", metavar="COMMAND", required=True)
    submit = jobs_sub.add_parser(
        "submit", help="queue offline work; a running `cloud serve` on this store answers it"
    )
    common(submit)
    submit.add_argument(
        "--kind", choices=("answer", "evaluate", "relabel", "distill"), required=True
    )
    submit.add_argument(
        "--file",
        type=Path,
        help="JSONL items ({question|text|messages}, evaluate: +expect; distill: one line of "
        "parameters such as steps, min_gain, labels)",
    )
    submit.add_argument(
        "--negative-feedback",
        action="store_true",
        help="relabel: take the interactions users rated negative",
    )
    submit.add_argument("--class", dest="only_class", help="keep only rows of this `class`")
    submit.set_defaults(func=_jobs_submit)
    listing = jobs_sub.add_parser("list", help="list jobs as JSON")
    common(listing)
    listing.set_defaults(func=_jobs_list)
    show = jobs_sub.add_parser("show", help="show one job (with --items: every result)")
    common(show)
    show.add_argument("job_id")
    show.add_argument("--items", action="store_true")
    show.set_defaults(func=_jobs_show)

    rollouts = sub.add_parser(
        "rollouts",
        help="list adapter rollouts as JSON: state, devices by status, and the last day's "
        "routing of the devices running each",
    )
    common(rollouts)
    rollouts.set_defaults(func=_rollouts)
    rollback = sub.add_parser(
        "rollback",
        help="undo an adapter: offer the one before it (or the base) under a new version",
    )
    common(rollback)
    rollback.add_argument("version", type=int)
    rollback.set_defaults(func=_rollback)

    routing = sub.add_parser(
        "routing",
        help="where devices answered their requests (from their reports) as JSON: in all, "
        "by adapter version, and why",
    )
    common(routing)
    routing.add_argument(
        "--hours",
        type=_window_hours,
        default=24.0,
        help="reports of periods ending in the last N hours (default 24, up to a year)",
    )
    routing.add_argument("--device", help="one device's reports only")
    routing.set_defaults(func=_routing)

    revoke = sub.add_parser(
        "revoke", help="revoke a device: a running cloud ends its session and refuses later ones"
    )
    common(revoke)
    revoke.add_argument("device_id")
    revoke.set_defaults(func=_revoke)

    forget = sub.add_parser(
        "forget",
        help="erase a device's data (interactions, feedback, reports, sessions, ...) and "
        "revoke it; a running cloud on SQLite sees it within revocation_poll_s (the admin "
        "API's DELETE /v1/devices/ID acts at once)",
    )
    common(forget)
    forget.add_argument("device_id")
    forget.set_defaults(func=_forget)

    rotate = sub.add_parser(
        "rotate-key",
        help="replace the bundle-signing key (server.key) with a new one it endorses: devices "
        "move to it as they reconnect; copy the new server.key to every replica and restart "
        "them",
    )
    common(rotate)
    rotate.set_defaults(func=_rotate_key)

    backup = sub.add_parser(
        "backup",
        help="copy the database (consistently, while the cloud serves), the signing key, the "
        "admin token and the bundles into a new directory, a data directory to serve from",
    )
    common(backup)
    backup.add_argument("destination", type=Path, help="a new or empty directory")
    backup.set_defaults(func=_backup)

    purge = sub.add_parser(
        "purge",
        help="delete interactions, feedback, reports, privacy events, ended sessions and "
        "expired tokens older than the retention period",
    )
    common(purge)
    purge.add_argument(
        "--older-than-days",
        type=float,
        help="retention period (default: the configured retention_days)",
    )
    purge.set_defaults(func=_purge)


def _note(text: str) -> str:
    from cloud_agent.store import MAX_TOKEN_NOTE

    if len(text) > MAX_TOKEN_NOTE:
        raise argparse.ArgumentTypeError(f"at most {MAX_TOKEN_NOTE} characters")
    return text


def _hours(text: str, most: float) -> float:
    """A number of hours: more than nothing, at most `most` (the ranges the admin API allows)."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0 < hours <= most:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {most:g}")
    return hours


def _ttl_hours(text: str) -> float:
    """A token's validity: at most a year."""
    return _hours(text, 24 * 365)


def _window_hours(text: str) -> float:
    """The routing summary's window."""
    from cloud_agent.store import MAX_ROUTING_HOURS  # the store is slow to import: when needed

    return _hours(text, MAX_ROUTING_HOURS)


def _config(args: argparse.Namespace) -> CloudConfig:
    options = [
        (key, value, "--" + option.replace("_", "-"))
        for option, key in (
            ("data_dir", "data_dir"),
            ("database_url", "database_url"),
            ("host", "host"),
            ("port", "port"),
            ("admin_port", "admin_port"),
            ("knowledge", "knowledge"),
            ("tls_cert", "tls_cert"),
            ("tls_key", "tls_key"),
            ("model", "backend.model_path"),
            ("loop", "event_loop"),
        )  # fmt: skip
        if (value := getattr(args, option, None)) is not None
    ]
    return load_config(CloudConfig, args.config, prefix=ENV_PREFIX, overrides=options)


def _serve(args: argparse.Namespace) -> int:
    config = _config(args)
    from cloud_agent.service import event_loop_factory

    with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
        return runner.run(_serve_async(config))


async def _serve_async(config: CloudConfig) -> int:
    from cloud_agent.service import CloudService, settle_heap

    service = await CloudService.create(config)
    # Signal handlers before the service announces itself: a SIGHUP sent as soon as the URL
    # is printed must reload, not end the process (its default action).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if config.knowledge is not None:

        def reload() -> None:
            task = asyncio.create_task(_reload_knowledge(service))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
    await service.start()
    settle_heap()
    print(f"edgeloop cloud agent: {service.url}", flush=True)
    print(
        f"admin API: {service.admin_url} "
        f"(token in {config.data_dir / 'admin.token'} unless set in the configuration)",
        flush=True,
    )
    print(f"event loop: {type(loop).__module__.split('.')[0]}", flush=True)
    await stop.wait()
    print("shutting down (draining in-flight requests) ...", file=sys.stderr, flush=True)
    await service.stop()
    return 0


async def _reload_knowledge(service: Any) -> None:
    from cloud_agent.errors import KnowledgeError, StoreError

    try:
        changes = await service.curator.reload()
    except (KnowledgeError, StoreError) as exc:
        print(f"knowledge not reloaded, the facts in use stay: {exc}", file=sys.stderr, flush=True)
        return
    print(f"knowledge reloaded: {json.dumps(changes)}", file=sys.stderr, flush=True)


async def _with_store(config: CloudConfig, action: Any, *, create: bool = False) -> Any:
    """Run `action` on the cloud's store. Only a command that adds to the store before the
    cloud first runs (`create`: an enrollment token, a job) makes a new one."""
    from cloud_agent.store import Store

    if create:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        url = config.resolved_database_url()
    else:
        url = config.existing_database_url()
    store = await Store.open(url)
    try:
        return await action(store)
    finally:
        await store.close()


def _enroll_token(args: argparse.Namespace) -> int:
    config = _config(args)
    token = asyncio.run(
        _with_store(
            config,
            lambda s: s.create_enrollment_token(timedelta(hours=args.ttl_hours), args.note),
            create=True,
        )
    )
    print(token)
    return 0


def _devices(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(_config(args), lambda s: s.list_devices()))
    print(json.dumps([d.as_dict() for d in rows], indent=2))
    return 0


def _interactions(args: argparse.Namespace) -> int:
    rows = asyncio.run(
        _with_store(
            _config(args),
            lambda s: s.list_interactions(
                limit=args.limit, device_id=args.device, status=args.status, before_id=args.before
            ),
        )
    )
    print(json.dumps([row.as_dict() for row in rows], indent=2))
    return 0


def _status(text: str) -> str:
    from cloud_agent.store import INTERACTION_STATUSES

    if text not in INTERACTION_STATUSES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(INTERACTION_STATUSES)}")
    return text


def _page_size(value: str) -> int:
    from cloud_agent.store import MAX_INTERACTIONS_PAGE

    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= size <= MAX_INTERACTIONS_PAGE:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_INTERACTIONS_PAGE}")
    return size


def _routing(args: argparse.Namespace) -> int:
    since = datetime.now(UTC) - timedelta(hours=args.hours)
    summary = asyncio.run(
        _with_store(_config(args), lambda s: s.routing_summary(since, device_id=args.device))
    )
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def _backup(args: argparse.Namespace) -> int:
    from cloud_agent.backup import backup

    written = backup(_config(args), args.destination)
    for path in written:
        print(path)
    if not any(path.suffix == ".db" for path in written):
        print("the database is not in the data directory: back it up with its own tools "
              "(PostgreSQL: pg_dump)", file=sys.stderr)  # fmt: skip
    return 0


def _forget(args: argparse.Namespace) -> int:
    deleted = asyncio.run(_with_store(_config(args), lambda s: s.forget_device(args.device_id)))
    if deleted is None:
        print(f"error: no device {args.device_id}", file=sys.stderr)
        return 1
    print(json.dumps({"device_id": args.device_id, "deleted": deleted}, indent=2))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    changed = asyncio.run(_with_store(_config(args), lambda s: s.revoke_device(args.device_id)))
    print(f"{args.device_id}: {'revoked' if changed else 'already revoked or unknown'}")
    return 0 if changed else 1


def _purge(args: argparse.Namespace) -> int:
    config = _config(args)
    days = args.older_than_days if args.older_than_days is not None else config.retention_days
    if days is None or days <= 0:
        print(
            "edgeloop: error: give --older-than-days N (N > 0) or set retention_days",
            file=sys.stderr,
        )
        return 2
    before = datetime.now(UTC) - timedelta(days=days)
    counts = asyncio.run(_with_store(config, lambda s: s.purge(before)))
    print(json.dumps(counts))
    return 0


def _rollouts(args: argparse.Namespace) -> int:
    from cloud_agent.rollout import rollouts

    print(json.dumps(asyncio.run(_with_store(_config(args), rollouts)), indent=2))
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    from cloud_agent.bundles import rotate_signing_key

    config = _config(args)
    config.existing_database_url()  # before a key is made in a directory that is not the cloud's
    new = asyncio.run(_with_store(config, lambda s: rotate_signing_key(config.data_dir, s)))
    print(
        f"{config.data_dir / 'server.key'} replaced: the bundle-signing key is now "
        f"{new.verify_key().b64()}, endorsed by the one before. Copy this server.key to every "
        "replica (and host that runs distill or rollback) and restart them; devices move to "
        "the new key as they reconnect."
    )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from cloud_agent.bundles import cluster_signing_key
    from cloud_agent.errors import CloudAgentError
    from cloud_agent.rollout import rollback
    from cloud_agent.store import Store

    config = _config(args)
    config.existing_database_url()  # before a key is made in a directory that is not the cloud's

    async def undo(store: Store) -> int:
        key = await cluster_signing_key(config.data_dir, store)
        return await rollback(
            store, args.version, signing_key=key, bundles_dir=config.data_dir / "bundles"
        )

    try:
        version = asyncio.run(_with_store(config, undo))
    except CloudAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"version {args.version} rolled back; version {version} undoes it")
    return 0


def _jobs_submit(args: argparse.Namespace) -> int:
    from cloud_agent.jobs import job_items_from_rows
    from shared.files import read_jsonl

    async def submit(store: Any) -> str:
        rows = read_jsonl(args.file) if args.file is not None else []
        if args.only_class:
            rows = [r for r in rows if r.get("class") == args.only_class]
        if args.kind == "relabel" and args.negative_feedback:
            for it in await store.list_interactions(limit=10_000):
                if it.rating == "negative":
                    rows.append({"messages": it.messages, "interaction_id": it.id})
        items = job_items_from_rows(args.kind, rows)
        job_id: str = await store.create_job(args.kind, items, {"source": str(args.file or "")})
        return job_id

    print(asyncio.run(_with_store(_config(args), submit, create=True)))
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    jobs = asyncio.run(_with_store(_config(args), lambda s: s.list_jobs()))
    print(json.dumps([j.as_dict() for j in jobs], indent=2))
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    async def show(store: Any) -> dict[str, Any] | None:
        job = await store.get_job(args.job_id)
        if job is None:
            return None
        out: dict[str, Any] = job.as_dict()
        if args.items:
            out["items"] = await store.job_items(job.id)
        return out

    out = asyncio.run(_with_store(_config(args), show))
    if out is None:
        print(f"no job {args.job_id}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0
