"""The loop turning by itself: a distill job once enough new training material has come in.

Every `auto_distill.check_s` the service asks `DistillTrigger.check`: it counts the answers that
could teach the next adapter (facts quoted, answers rated up or corrected) since the last distill
job was submitted, and submits one when there are at least `auto_distill.after_examples` of them
and no distill job is waiting or running. The job runs as any distill job does (in the scheduler's
offline lane, gated against the base model and the adapter on offer now, so a cycle publishes
only an improvement). Replicas sharing a store submit it once: its id is derived from the
last job's.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from sqlalchemy.exc import IntegrityError

from cloud_agent.store import Store

__all__ = ["DistillTrigger"]

log = logging.getLogger("edgeloop.cloud.autodistill")


class DistillTrigger:
    """Submits a distill job once `after_examples` new training candidates have come in."""

    def __init__(self, store: Store, *, after_examples: int, params: dict[str, Any]) -> None:
        if after_examples < 1:
            raise ValueError("after_examples must be at least 1")
        self.store = store
        self.after_examples = after_examples
        self.params = params
        """The job's parameters, as `edgeloop cloud jobs submit --kind distill` takes them."""

    async def check(self) -> str | None:
        """The id of the distill job submitted now, or None when none is due (or another
        replica submitted it). Raises `StoreError` when the store cannot say."""
        last = await self.store.latest_job("distill")
        if last is not None and last.status != "done":
            return None  # one cycle at a time
        since = last.created_at if last is not None else None
        new = await self.store.count_training_candidates(since)
        if new < self.after_examples:
            return None
        # The same id on every replica that finds this cycle due, and another for the next.
        after = last.id if last is not None else ""
        job_id = f"job_auto_{hashlib.sha256(after.encode()).hexdigest()[:16]}"
        try:
            await self.store.create_job(
                "distill", [dict(self.params)], {"source": "auto", "new_examples": new},
                job_id=job_id,
            )  # fmt: skip
        except IntegrityError:
            return None  # another replica submitted it
        log.info("%d new training examples since the last cycle: distill job %s", new, job_id)
        return job_id
