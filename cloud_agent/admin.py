"""The admin HTTP API (Starlette): health, readiness, Prometheus metrics, devices, enrollment
tokens, interactions, feedback, the fleet's routing, load, knowledge (and its reload), adapters,
rollouts and offline jobs. Everything but `/healthz` and `/readyz` needs
``Authorization: Bearer <admin token>``."""

from __future__ import annotations

import hmac
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cloud_agent.errors import KnowledgeError, StoreError
from cloud_agent.jobs import JobSpecError, job_items_from_rows
from cloud_agent.rollout import rollouts as list_rollouts
from cloud_agent.store import (
    INTERACTION_STATUSES,
    MAX_INTERACTIONS_PAGE,
    MAX_ROUTING_HOURS,
    MAX_TOKEN_NOTE,
)
from shared.errors import ConfigError

if TYPE_CHECKING:
    from cloud_agent.service import CloudService

__all__ = ["build_admin_app"]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def build_admin_app(service: CloudService) -> Starlette:
    token = service.admin_token

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), token.encode())

    def guarded(handler: Any) -> Any:
        async def wrapper(request: Request) -> Response:
            if not authorized(request):
                return _json({"error": "unauthorized", "message": "admin token required"}, 401)
            try:
                response: Response = await handler(request)
                return response
            except StoreError as exc:
                return _json({"error": "store_unavailable", "message": str(exc)}, 503)

        return wrapper

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await service.store.ping()
        except StoreError as exc:
            return _json({"status": "unavailable", "store": str(exc)}, 503)
        if service.draining:
            return _json({"status": "draining"}, 503)
        # A replica that does not hear the others still serves (their notices are also polled
        # for): ready, and it says so.
        cluster = service.cluster
        replicas = "listening" if cluster.listening else "not listening" if cluster.shared else None
        return _json(
            {"status": "ready", "sessions": service.server.session_count, "replicas": replicas}
        )

    async def metrics(request: Request) -> Response:
        service.refresh_gauges()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def devices(request: Request) -> Response:
        return _json([d.as_dict() for d in await service.store.list_devices()])

    async def revoke(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        if await service.store.get_device(device_id) is None:
            return _json({"error": "not_found", "message": "no such device"}, 404)
        changed = await service.revoke(device_id)
        return _json({"device_id": device_id, "revoked": True, "changed": changed})

    async def forget(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        deleted = await service.forget(device_id)
        if deleted is None:
            return _json({"error": "not_found", "message": "no such device"}, 404)
        return _json({"device_id": device_id, "forgotten": True, "deleted": deleted})

    async def create_token(request: Request) -> Response:
        try:
            body = await request.json() if await request.body() else {}
            if not isinstance(body, dict):
                raise TypeError
            if unknown := sorted(set(body) - {"ttl_hours", "note"}):
                # A misspelt ttl_hours must not issue a token that lives a week.
                message = f"unknown field(s) {', '.join(unknown)}: expected ttl_hours, note"
                return _json({"error": "bad_request", "message": message}, 400)
            hours = body.get("ttl_hours", 168)
            note = body.get("note")
            if isinstance(hours, bool) or not isinstance(hours, int | float):
                raise TypeError
            if note is not None and not isinstance(note, str):
                raise TypeError
        except (ValueError, TypeError, AttributeError):
            message = "expected {ttl_hours: a number, note: text}"
            return _json({"error": "bad_request", "message": message}, 400)
        if not 0 < hours <= 24 * 365:
            return _json({"error": "bad_request", "message": "ttl_hours out of range"}, 400)
        if note is not None and len(note) > MAX_TOKEN_NOTE:
            message = f"note holds at most {MAX_TOKEN_NOTE} characters"
            return _json({"error": "bad_request", "message": message}, 400)
        value = await service.store.create_enrollment_token(timedelta(hours=hours), note)
        return _json({"token": value, "ttl_hours": hours}, 201)

    async def interactions(request: Request) -> Response:
        params = request.query_params
        try:
            limit = min(MAX_INTERACTIONS_PAGE, max(1, int(params.get("limit", "100"))))
            before = int(params["before"]) if "before" in params else None
        except ValueError:
            message = "limit and before must be integers"
            return _json({"error": "bad_request", "message": message}, 400)
        status = params.get("status")
        if status is not None and status not in INTERACTION_STATUSES:
            # An unknown status would match nothing: say so rather than answer [].
            message = f"status must be one of {', '.join(INTERACTION_STATUSES)}"
            return _json({"error": "bad_request", "message": message}, 400)
        rows = await service.store.list_interactions(
            limit=limit,
            device_id=params.get("device"),
            status=status,
            before_id=before,
        )
        return _json([row.as_dict() for row in rows])

    async def feedback_summary(request: Request) -> Response:
        return _json(asdict(await service.store.feedback_summary()))

    async def routing(request: Request) -> Response:
        try:
            hours = float(request.query_params.get("hours", "24"))
        except ValueError:
            hours = -1.0
        if not 0 < hours <= MAX_ROUTING_HOURS:
            message = f"hours must be a number above 0 and at most {MAX_ROUTING_HOURS}"
            return _json({"error": "bad_request", "message": message}, 400)
        since = datetime.now(UTC) - timedelta(hours=hours)
        device = request.query_params.get("device")
        return _json((await service.store.routing_summary(since, device_id=device)).as_dict())

    async def load(request: Request) -> Response:
        return _json(
            {
                "scheduler": asdict(service.scheduler.load()),
                "backends": service.backend_health(),
                "sessions": service.server.session_count,
                "interaction_log": service.server.recorder.stats(),
            }
        )

    async def knowledge(request: Request) -> Response:
        return _json(service.curator.info())

    async def reload_knowledge(request: Request) -> Response:
        if service.config.knowledge is None:
            message = "no knowledge file is configured"
            return _json({"error": "no_knowledge", "message": message}, 409)
        try:
            return _json(await service.curator.reload())
        except KnowledgeError as exc:
            # The facts in use stay: a broken file never empties the index.
            return _json({"error": "invalid_knowledge", "message": str(exc)}, 422)

    async def adapters(request: Request) -> Response:
        return _json(await service.store.list_adapters())

    async def rollouts(request: Request) -> Response:
        return _json(await list_rollouts(service.store))

    async def rollout_action(request: Request) -> Response:
        try:
            version = int(request.path_params["version"])
        except ValueError:
            return _json({"error": "bad_request", "message": "version must be an integer"}, 400)
        action = request.path_params["action"]
        if await service.store.get_adapter(version) is None:
            return _json({"error": "not_found", "message": f"no adapter version {version}"}, 404)
        if action == "rollback":
            try:
                new_version = await service.rollback(version)
            except ConfigError as exc:  # this replica's server.key was rotated out
                return _json({"error": "signing_key", "message": str(exc)}, 409)
            return _json({"rolled_back": version, "version": new_version})
        state = {"halt": "halted", "promote": "active"}.get(action)
        if state is None:
            return _json({"error": "not_found", "message": "actions: rollback, halt, promote"}, 404)
        changed = await service.store.set_rollout_state(version, state, f"operator: {action}")
        if changed:
            await service.published()
        return _json({"version": version, "state": state, "changed": changed})

    async def submit_job(request: Request) -> Response:
        try:
            body = await request.json()
            items = job_items_from_rows(str(body.get("kind")), list(body.get("items") or []))
        except JobSpecError as exc:
            return _json({"error": "bad_request", "message": str(exc)}, 400)
        except (ValueError, TypeError, AttributeError):
            return _json({"error": "bad_request", "message": "expected {kind, items}"}, 400)
        job_id = await service.store.create_job(body["kind"], items, body.get("params"))
        service.jobs.wake()
        return _json({"id": job_id, "total": len(items)}, 201)

    async def list_jobs(request: Request) -> Response:
        return _json([j.as_dict() for j in await service.store.list_jobs()])

    async def show_job(request: Request) -> Response:
        job = await service.store.get_job(request.path_params["job_id"])
        if job is None:
            return _json({"error": "not_found", "message": "no such job"}, 404)
        out = job.as_dict()
        if request.query_params.get("items"):
            out["items"] = await service.store.job_items(job.id)
        return _json(out)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", guarded(metrics)),
            Route("/v1/devices", guarded(devices)),
            Route("/v1/devices/{device_id}/revoke", guarded(revoke), methods=["POST"]),
            Route("/v1/devices/{device_id}", guarded(forget), methods=["DELETE"]),
            Route("/v1/enrollment-tokens", guarded(create_token), methods=["POST"]),
            Route("/v1/interactions", guarded(interactions)),
            Route("/v1/feedback/summary", guarded(feedback_summary)),
            Route("/v1/routing", guarded(routing)),
            Route("/v1/load", guarded(load)),
            Route("/v1/knowledge", guarded(knowledge)),
            Route("/v1/knowledge/reload", guarded(reload_knowledge), methods=["POST"]),
            Route("/v1/adapters", guarded(adapters)),
            Route("/v1/rollouts", guarded(rollouts)),
            Route("/v1/rollouts/{version}/{action}", guarded(rollout_action), methods=["POST"]),
            Route("/v1/jobs", guarded(list_jobs)),
            Route("/v1/jobs", guarded(submit_job), methods=["POST"]),
            Route("/v1/jobs/{job_id}", guarded(show_job)),
        ]
    )
