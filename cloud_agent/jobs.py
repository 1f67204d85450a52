"""Offline jobs: work that fills the backends' idle capacity through the scheduler's offline
lane, so live escalations are never slowed by it.

Kinds:
- ``answer``: bulk question answering; an item is ``{"question": ...}`` or ``{"messages": [...]}``.
- ``evaluate``: like ``answer``, plus ``"expect"`` groups; each output says whether the answer held
  every group, and the job reports how many did.
- ``relabel``: re-answer stored interactions (``{"messages": [...], "interaction_id": n}``), e.g.
  those with negative feedback, to build distillation data.
- ``distill``: one learning cycle; its one item holds the cycle's parameters (`DISTILL_PARAMS`,
  all optional), checked when the job is submitted.

Jobs live in the store; a `JobRunner` in each cloud replica claims items, answers them and
writes the results. Items of a replica that dies are retaken after their lease; nothing is
dropped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cloud_agent.agent import CloudAgent
from cloud_agent.backends.base import ChatTurn
from cloud_agent.errors import CloudAgentError
from cloud_agent.evaluation import contains_expected
from cloud_agent.store import Store

if TYPE_CHECKING:
    from cloud_agent.distill.pipeline import DistillConfig

__all__ = ["JOB_KINDS", "JobRunner", "JobSpecError", "job_items_from_rows"]

log = logging.getLogger("edgeloop.cloud.jobs")

JobKind = Literal["answer", "evaluate", "relabel", "distill"]
JOB_KINDS: tuple[JobKind, ...] = ("answer", "evaluate", "relabel", "distill")
LORA_PARAMS = ("steps", "rank", "alpha", "learning_rate", "batch_size", "seed")
"""Parameters of a distill job that set the LoRA training (`LoraSettings`)."""
DISTILL_PARAMS = frozenset({*LORA_PARAMS, "min_gain", "min_gain_over_incumbent", "labels"})
_INTEGERS = frozenset({"steps", "rank", "batch_size", "seed"})


class JobSpecError(CloudAgentError):
    """A submitted job or one of its items is malformed."""


def _turns(item: dict[str, Any]) -> list[ChatTurn]:
    if "messages" in item:
        turns = [ChatTurn(m["role"], str(m["content"])) for m in item["messages"]]
        if any(t.role not in ("system", "user", "assistant") for t in turns):
            raise ValueError("roles are system, user and assistant")
    else:
        turns = [ChatTurn("user", str(item["question"]))]
    if not turns or turns[-1].role != "user":
        raise ValueError("the conversation must end with a user turn")
    return turns


def _check_distill_params(params: dict[str, Any]) -> None:
    """`JobSpecError` for a value the cycle would fail on, found now rather than after the job
    has waited its turn."""
    for key, value in params.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _INTEGERS and not (number and isinstance(value, int)):
            raise JobSpecError(f"distill parameter {key} must be an integer, not {value!r}")
        if key in ("alpha", "learning_rate", "min_gain", "min_gain_over_incumbent") and not number:
            raise JobSpecError(f"distill parameter {key} must be a number, not {value!r}")
    labels = params.get("labels")
    if labels is not None and not (isinstance(labels, str) and Path(labels).is_file()):
        raise JobSpecError(
            f"distill parameter labels {labels!r}: not a file on the cloud's machine "
            "(the path of a labelled workload, JSON lines)"
        )
    from cloud_agent.distill.train import DistillSettingsError

    try:  # the ranges, as the cycle will check them
        distill_config(params)
    except DistillSettingsError as exc:
        raise JobSpecError(f"distill parameters: {exc}") from None


def distill_config(params: dict[str, Any], **settings: Any) -> DistillConfig:
    """A cycle's settings from a distill job's parameters (`DISTILL_PARAMS`, checked); the
    `settings` are what the job does not say (expectations, the cloud's canary share and phone
    regions). Raises `DistillSettingsError` for a value out of range."""
    from cloud_agent.distill.pipeline import DistillConfig
    from cloud_agent.distill.train import LoraSettings

    lora = LoraSettings(progress=False, **{k: params[k] for k in LORA_PARAMS if k in params})
    return DistillConfig(
        lora=lora,
        min_gain=params.get("min_gain", DistillConfig.min_gain),
        min_gain_over_incumbent=params.get(
            "min_gain_over_incumbent", DistillConfig.min_gain_over_incumbent
        ),
        **settings,
    )


def job_items_from_rows(kind: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate and normalise submitted items (workload rows use ``text`` for the question)."""
    if kind not in JOB_KINDS:
        raise JobSpecError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    if kind == "distill":
        # One item: the cycle's parameters (all optional).
        params = rows[0] if rows else {}
        if len(rows) > 1 or not isinstance(params, dict) or set(params) - DISTILL_PARAMS:
            raise JobSpecError(
                f"a distill job takes one item with keys from {sorted(DISTILL_PARAMS)}"
            )
        _check_distill_params(params)
        return [dict(params)]
    if not rows:
        raise JobSpecError("a job needs at least one item")
    items = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise JobSpecError(f"item {n}: expected an object")
        item = dict(row)
        if "text" in item and "question" not in item and "messages" not in item:
            item["question"] = item.pop("text")
        try:
            _turns(item)
        except (KeyError, TypeError, ValueError) as exc:
            raise JobSpecError(f"item {n}: needs 'question' (or 'text') or 'messages'") from exc
        if kind == "evaluate":
            expect = item.get("expect")
            if not (isinstance(expect, list) and all(isinstance(g, list) and g for g in expect)):
                raise JobSpecError(f"item {n}: evaluate items need 'expect' groups")
        items.append(item)
    return items


class JobRunner:
    """Claims job items from the store and answers them in the offline lane."""

    def __init__(
        self,
        store: Store,
        agent: CloudAgent,
        *,
        workers: int = 2,
        poll_s: float = 2.0,
        max_tokens: int = 256,
        distiller: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.agent = agent
        self.workers = workers
        self.poll_s = poll_s
        self.max_tokens = max_tokens
        self.distiller = distiller
        self.runner_id = f"run_{secrets.token_hex(6)}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-runner")

    def wake(self) -> None:
        """New work was submitted in this process: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; items being answered finish first (their results are kept)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.workers)
        active: set[asyncio.Task[None]] = set()
        while not self._stopping:
            free = self.workers - len(active)
            items = []
            if free > 0:
                try:
                    items = await self.store.claim_job_items(self.runner_id, free)
                except CloudAgentError as exc:
                    log.warning("cannot claim job items: %s", exc)
            for item in items:
                await slots.acquire()
                task = asyncio.create_task(self._work(item.job_id, item.idx, item.kind, item.input))
                active.add(task)
                task.add_done_callback(active.discard)
                task.add_done_callback(lambda _: slots.release())
            if not items:
                self._wake.clear()
                waiters = [asyncio.create_task(self._wake.wait())]
                if active:
                    waiters.append(asyncio.create_task(asyncio.wait(list(active))))  # type: ignore[arg-type]
                done, pending = await asyncio.wait(
                    waiters, timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in pending:
                    waiter.cancel()
        if active:
            await asyncio.gather(*active, return_exceptions=True)

    async def _work(self, job_id: str, idx: int, kind: str, item: dict[str, Any]) -> None:
        if kind == "distill":
            await self._distill(job_id, idx, item)
            return
        try:
            answer = await self.agent.complete(
                _turns(item), max_tokens=self.max_tokens, lane="offline"
            )
        except (CloudAgentError, KeyError, TypeError, ValueError) as exc:
            await self._finish(job_id, idx, error=f"{type(exc).__name__}: {exc}"[:256])
            return
        output: dict[str, Any] = {
            "answer": answer.text,
            "fact_ids": list(answer.fact_ids),
            "model": answer.model,
            "grounded": answer.grounded,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        }
        if kind == "evaluate":
            output["correct"] = contains_expected(answer.text, item["expect"])
        await self._finish(job_id, idx, output=output)

    async def _distill(self, job_id: str, idx: int, params: dict[str, Any]) -> None:
        if self.distiller is None:
            await self._finish(job_id, idx, error="this cloud cannot distil (no distiller)")
            return
        # Admitted by the scheduler's offline lane: it starts only when online traffic leaves
        # room. Training itself runs in a worker thread, not in a backend slot.
        async with self.agent.scheduler.slot("offline"):
            pass
        try:
            output = await self.distiller(params)
        except Exception as exc:  # noqa: BLE001 - any failure is the job's result, kept
            log.exception("distillation failed")
            await self._finish(job_id, idx, error=f"{type(exc).__name__}: {exc}"[:256])
            return
        await self._finish(job_id, idx, output=output)

    async def _finish(self, job_id: str, idx: int, **result: Any) -> None:
        try:
            await self.store.finish_job_item(job_id, idx, **result)
        except CloudAgentError as exc:
            # Left claimed: the lease expires and the item is answered again. Nothing is lost.
            log.warning("cannot store the result of %s/%s: %s", job_id, idx, exc)
