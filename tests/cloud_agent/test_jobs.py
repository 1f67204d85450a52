"""Offline jobs: submitted through the admin API or the CLI, answered in the offline lane,
never dropped, and never in the way of online requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from cloud_agent.autodistill import DistillTrigger
from cloud_agent.backends import ScriptedBackend
from cloud_agent.config import CloudConfig
from cloud_agent.jobs import JobSpecError, job_items_from_rows
from cloud_agent.store import NewInteraction, Store, tables
from cloud_agent.store.store import sqlite_url
from shared.cli import main
from tests.cloud_fixtures import Cloud

pytestmark = pytest.mark.slow


async def wait_done(cloud: Cloud, job_id: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while (job := await cloud.service.store.get_job(job_id)) is None or job.status != "done":
            await asyncio.sleep(0.02)
    return job


def auth(cloud: Cloud) -> dict[str, str]:
    return {"Authorization": f"Bearer {cloud.service.admin_token}"}


async def test_an_evaluation_job_scores_answers_against_expected_facts(cloud: Cloud) -> None:
    items = [
        {"text": "Is shipping free?", "expect": [["$75"]]},
        {"text": "How do I choose a sleeping bag for winter?", "expect": [["never said"]]},
    ]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cloud.service.admin_port}") as client:
        created = await client.post(
            "/v1/jobs", headers=auth(cloud), json={"kind": "evaluate", "items": items}
        )
        assert created.status_code == 201
        job = await wait_done(cloud, created.json()["id"])
        assert (job.total, job.done, job.failed, job.correct) == (2, 2, 0, 1)
        shown = (await client.get(f"/v1/jobs/{job.id}?items=1", headers=auth(cloud))).json()
    assert [i["output"]["correct"] for i in shown["items"]] == [True, False]
    assert shown["items"][0]["output"]["grounded"] is True


async def test_a_distill_job_runs_a_cycle_and_keeps_its_outcome(cloud: Cloud) -> None:
    """With nothing learned yet, the cycle declines to train; its reason is the job's output."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cloud.service.admin_port}") as client:
        created = await client.post(
            "/v1/jobs", headers=auth(cloud), json={"kind": "distill", "items": [{"steps": 3}]}
        )
        assert created.status_code == 201
        job = await wait_done(cloud, created.json()["id"])
        shown = (await client.get(f"/v1/jobs/{job.id}?items=1", headers=auth(cloud))).json()
        refused = await client.post(
            "/v1/jobs", headers=auth(cloud), json={"kind": "distill", "items": [{"epochs": 3}]}
        )
    output = shown["items"][0]["output"]
    assert output["published"] is False and "fewer than" in output["reason"]
    assert refused.status_code == 400


async def test_bad_job_submissions_are_refused_with_a_reason(cloud: Cloud) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cloud.service.admin_port}") as client:
        bodies = [
            {"kind": "dance", "items": [{"question": "x"}]},
            {"kind": "answer", "items": []},
            {"kind": "evaluate", "items": [{"question": "x"}]},
            {"kind": "answer", "items": [3]},
        ]
        for body in bodies:
            response = await client.post("/v1/jobs", headers=auth(cloud), json=body)
            assert response.status_code == 400, body
            assert response.json()["error"] == "bad_request"
    with pytest.raises(JobSpecError, match="item 0"):
        job_items_from_rows("answer", [{"nothing": 1}])
    with pytest.raises(JobSpecError, match="item 0"):
        job_items_from_rows("answer", [{"messages": [{"role": "tool", "content": "42"}]}])


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"steps": "many"}, "steps must be an integer"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"rank": True}, "rank must be an integer"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"steps": 0}, "steps 0: at least 1"),
        ({"alpha": -1}, "alpha -1: above 0"),
        ({"min_gain": 3}, "min_gain 3: -1 to 1"),
        ({"min_gain_over_incumbent": "some"}, "min_gain_over_incumbent must be a number"),
        ({"min_gain_over_incumbent": -2}, "min_gain_over_incumbent -2: -1 to 1"),
        ({"labels": "/nowhere/labels.jsonl"}, "not a file on the cloud's machine"),
    ],
)
def test_a_distill_job_that_would_fail_is_refused_when_submitted(
    params: dict[str, object], problem: str
) -> None:
    # Refused at once, with the reason: not accepted, queued, and failed when its turn comes.
    with pytest.raises(JobSpecError, match=problem):
        job_items_from_rows("distill", [params])
    assert job_items_from_rows("distill", [{"steps": 3, "learning_rate": 1e-3}]) == [
        {"steps": 3, "learning_rate": 1e-3}
    ]


@pytest.mark.cloud(backend=ScriptedBackend("done", delay_s=0.05), capacity=1)
async def test_offline_work_yields_to_online_requests_and_all_of_it_completes(cloud: Cloud) -> None:
    job_id = await cloud.service.store.create_job(
        "answer",
        [{"question": f"Describe trail number {i} in detail please, at length."} for i in range(8)],
    )
    cloud.service.jobs.wake()
    device, _ = await cloud.enroll()
    from protocol import ChatMessage, Escalate, ResultReceived

    async with asyncio.timeout(5):
        while cloud.service.scheduler.load().offline_in_flight == 0:
            await asyncio.sleep(0.005)
    question = ChatMessage(role="user", content="What should I wear for a rainy hike in the hills?")
    await device.send(
        Escalate(request_id="req_live", messages=[question], deadline_ms=3000, max_tokens=16)
    )
    event = await device.next_event(ResultReceived)
    assert isinstance(event, ResultReceived), event
    # The online request waited for at most the one offline item already running.
    assert cloud.service.scheduler.load().online_wait_s < 0.2
    job = await wait_done(cloud, job_id)
    assert (job.done, job.failed) == (8, 0)
    await device.close()


async def test_items_claimed_by_a_runner_that_died_are_retaken(cloud: Cloud) -> None:
    from datetime import timedelta

    store = cloud.service.store
    await cloud.service.jobs.stop()  # nobody else takes the items during this test
    job_id = await store.create_job("answer", [{"question": "a"}, {"question": "b"}])
    first = await store.claim_job_items("dead-runner", 10)
    assert len(first) == 2
    assert await store.claim_job_items("other", 10) == []
    retaken = await store.claim_job_items("other", 10, lease=timedelta(seconds=0))
    assert {c.idx for c in retaken} == {0, 1}
    for item in retaken:
        await store.finish_job_item(job_id, item.idx, output={"answer": "x"})
    await store.finish_job_item(job_id, 0, output={"answer": "late"})  # the dead runner's write
    job = await store.get_job(job_id)
    assert job is not None and (job.status, job.done) == ("done", 2)


def test_the_cli_submits_lists_and_shows_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workload_path: Path
) -> None:
    data = ["--data-dir", str(tmp_path)]
    submit = ["--kind", "evaluate", "--file", str(workload_path), "--class", "learnable_fact"]
    assert main(["cloud", "jobs", "submit", *data, *submit]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("job_")
    assert main(["cloud", "jobs", "list", *data]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["id"] == job_id and listed["total"] == 80 and listed["status"] == "queued"
    assert main(["cloud", "jobs", "show", *data, "job_missing"]) == 1
    assert sqlite_url(tmp_path / "cloud.db").endswith("cloud.db")


async def test_a_distill_job_is_submitted_by_itself_once_enough_new_examples_came_in(
    tmp_path: Path,
) -> None:
    store = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    try:
        token = await store.create_enrollment_token()
        await store.enroll_device(token, "dev_a", "A" * 43)

        async def quoted(n: int) -> None:
            await store.record_interaction(
                NewInteraction(
                    device_id="dev_a", request_id=f"q{n}", status="ok", backend="knowledge",
                    messages=[{"role": "user", "content": f"question {n}"}], placeholders=[],
                    answer="a fact",
                )
            )  # fmt: skip

        trigger = DistillTrigger(store, after_examples=2, params={"steps": 3})
        await quoted(1)
        assert await trigger.check() is None  # one new example of the two it waits for
        await quoted(2)
        first = await trigger.check()
        assert first is not None
        job = await store.get_job(first)
        assert job is not None and job.kind == "distill"
        assert job.params == {"source": "auto", "new_examples": 2}
        assert await store.job_items(first) == [
            {"idx": 0, "status": "pending", "input": {"steps": 3}, "output": None, "error": None}
        ]
        # One cycle at a time: nothing more while it waits or runs, whatever comes in.
        await quoted(3)
        await quoted(4)
        assert await trigger.check() is None
        async with store.engine.begin() as conn:  # the cycle ran
            await conn.execute(
                update(tables.Job).where(tables.Job.id == first).values(status="done")
            )
        # Counted since that job was submitted: two new ones make the next cycle due, once,
        # whichever replica asks first.
        twin = DistillTrigger(store, after_examples=2, params={"steps": 3})
        second = await trigger.check()
        assert second is not None and second != first
        assert await twin.check() is None
        assert [j.id for j in await store.list_jobs()].count(second) == 1
    finally:
        await store.close()


def test_a_bad_auto_distill_setting_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="distill parameter steps must be an integer"):
        CloudConfig.model_validate(
            {"auto_distill": {"after_examples": 5, "params": {"steps": "x"}}}
        )
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        CloudConfig.model_validate({"auto_distill": {"after_examples": 0}})
