"""Store operations for offline jobs (a mixin of `Store`).

Items are claimed with a conditional update, so several runners (several replicas on one
PostgreSQL) never take the same item; a claim older than its lease is returned to the queue,
so nothing is lost when a runner dies.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloud_agent.store import tables as t
from cloud_agent.store.database import Transactions, now

__all__ = ["ClaimedItem", "JobRecord", "JobStore"]


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    kind: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    total: int
    done: int
    failed: int
    params: dict[str, Any]
    correct: int | None = None
    """For evaluation jobs: items whose answer held every expected group."""

    def as_dict(self) -> dict[str, Any]:
        """Every field, as JSON takes it (times in ISO 8601)."""
        finished = self.finished_at.isoformat() if self.finished_at else None
        return asdict(self) | {"created_at": self.created_at.isoformat(), "finished_at": finished}


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    job_id: str
    idx: int
    kind: str
    input: dict[str, Any]


class JobStore(Transactions):
    """Offline jobs: submit, claim, complete, inspect."""

    async def create_job(
        self,
        kind: str,
        items: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
    ) -> str:
        """A queued job and its items; its id. `job_id` names it (IntegrityError when a job has
        that id: replicas submitting the same scheduled job store it once)."""
        job_id = job_id or f"job_{secrets.token_hex(8)}"
        async with self._tx() as s:
            s.add(
                t.Job(
                    id=job_id, kind=kind, status="queued", created_at=now(), total=len(items),
                    done=0, failed=0, params=dict(params or {}),
                )
            )  # fmt: skip
            await s.flush()
            s.add_all(
                t.JobItem(job_id=job_id, idx=i, status="pending", input=item, output=None)
                for i, item in enumerate(items)
            )
        return job_id

    async def claim_job_items(
        self, runner_id: str, limit: int, lease: timedelta = timedelta(minutes=10)
    ) -> list[ClaimedItem]:
        """Take up to `limit` pending items, oldest job first; stale claims are retaken."""
        started = now()
        claimed: list[ClaimedItem] = []
        async with self._tx() as s:
            await s.execute(
                update(t.JobItem)
                .where(t.JobItem.status == "running", t.JobItem.claimed_at < started - lease)
                .values(status="pending", claimed_by=None, claimed_at=None)
            )
            rows = (
                await s.execute(
                    select(t.JobItem.job_id, t.JobItem.idx, t.Job.kind, t.JobItem.input)
                    .join(t.Job, t.Job.id == t.JobItem.job_id)
                    .where(t.JobItem.status == "pending", t.Job.status.in_(("queued", "running")))
                    .order_by(t.Job.created_at, t.JobItem.idx)
                    .limit(limit)
                )
            ).all()
            for job_id, idx, kind, item_input in rows:
                result = await s.execute(
                    update(t.JobItem)
                    .where(
                        t.JobItem.job_id == job_id,
                        t.JobItem.idx == idx,
                        t.JobItem.status == "pending",
                    )  # fmt: skip
                    .values(status="running", claimed_by=runner_id, claimed_at=started)
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    claimed.append(ClaimedItem(job_id, idx, kind, dict(item_input)))
            for job_id in {c.job_id for c in claimed}:
                await s.execute(
                    update(t.Job).where(t.Job.id == job_id, t.Job.status == "queued")
                    .values(status="running")
                )  # fmt: skip
        return claimed

    async def finish_job_item(
        self,
        job_id: str,
        idx: int,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        async with self._tx() as s:
            result = await s.execute(
                update(t.JobItem)
                .where(
                    t.JobItem.job_id == job_id, t.JobItem.idx == idx, t.JobItem.status == "running"
                )
                .values(status="failed" if error else "done", output=output, error=error)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                return  # the lease expired and someone else took it
            column = t.Job.failed if error else t.Job.done
            await s.execute(update(t.Job).where(t.Job.id == job_id).values({column: column + 1}))
            job = await s.get(t.Job, job_id)
            if job is not None and job.done + job.failed >= job.total:
                job.status, job.finished_at = "done", now()

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._tx() as s:
            job = await s.get(t.Job, job_id)
            if job is None:
                return None
            return await _record(s, job)

    async def latest_job(self, kind: str) -> JobRecord | None:
        """The job of `kind` submitted last."""
        async with self._tx() as s:
            job = await s.scalar(
                select(t.Job).where(t.Job.kind == kind).order_by(t.Job.created_at.desc()).limit(1)
            )
            return None if job is None else await _record(s, job)

    async def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        async with self._tx() as s:
            jobs = (
                await s.scalars(select(t.Job).order_by(t.Job.created_at.desc()).limit(limit))
            ).all()
            return [await _record(s, j) for j in jobs]

    async def job_items(self, job_id: str) -> list[dict[str, Any]]:
        async with self._tx() as s:
            rows = (
                await s.scalars(
                    select(t.JobItem).where(t.JobItem.job_id == job_id).order_by(t.JobItem.idx)
                )
            ).all()
            return [
                {
                    "idx": r.idx,
                    "status": r.status,
                    "input": r.input,
                    "output": r.output,
                    "error": r.error,
                }
                for r in rows
            ]


async def _record(s: AsyncSession, job: t.Job) -> JobRecord:
    correct = None
    if job.kind == "evaluate":
        outputs = (
            await s.scalars(
                select(t.JobItem.output).where(
                    t.JobItem.job_id == job.id, t.JobItem.status == "done"
                )
            )
        ).all()
        correct = sum(1 for o in outputs if o and o.get("correct"))
    return JobRecord(
        id=job.id, kind=job.kind, status=job.status, created_at=job.created_at,
        finished_at=job.finished_at, total=job.total, done=job.done, failed=job.failed,
        params=dict(job.params), correct=correct,
    )  # fmt: skip
