"""One distillation cycle end to end (tiny training), and the evaluation gate's decisions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud_agent.distill.dataset import Example, expectations_from_workload
from cloud_agent.distill.evaluate import expectation, key_values, simple_regressions
from cloud_agent.distill.pipeline import DistillConfig, distill, gate
from cloud_agent.distill.train import LoraSettings
from cloud_agent.errors import CloudAgentError
from cloud_agent.store import NewInteraction, Store
from cloud_agent.store.store import sqlite_url
from edge_agent.updates import verify_offer
from shared import SigningKey
from shared.llama import default_model_path, file_sha256

FIGURES = {"heldout_examples": 10.0, "heldout_accuracy_before": 0.1,
           "heldout_accuracy_after": 0.6, "simple_regressions": 0.0}  # fmt: skip


def test_the_gate_publishes_only_a_clear_improvement_without_regressions() -> None:
    config = DistillConfig(min_gain=0.2)
    assert gate(FIGURES, config)[0] is True
    assert gate({**FIGURES, "heldout_accuracy_after": 0.25}, config) == (
        False, "held-out accuracy gain +0.15 below the margin 0.20",
    )  # fmt: skip
    assert gate({**FIGURES, "simple_regressions": 1.0}, config)[0] is False
    assert gate({**FIGURES, "heldout_examples": 0.0}, config)[0] is False


def test_the_gate_replaces_the_adapter_on_offer_only_with_one_as_good() -> None:
    config = DistillConfig(min_gain=0.2)
    offered = {**FIGURES, "incumbent_version": 3.0, "heldout_accuracy_incumbent": 0.7}
    assert gate(offered, config) == (
        False,
        "held-out accuracy 60% against 70% for version 3, on offer now: gain -0.10 below the "
        "margin 0.00",
    )
    assert gate({**offered, "heldout_accuracy_incumbent": 0.6}, config) == (
        True, "held-out accuracy 10% -> 60% (60% for version 3, on offer now)",
    )  # fmt: skip
    assert gate(offered, DistillConfig(min_gain=0.2, min_gain_over_incumbent=-0.1))[0] is True


def test_expectations_and_regressions_are_measured_on_key_values() -> None:
    assert key_values("Costs $12.50, open 7:30 to 21:00, 10% off.") == {
        "$12.50", "7:30", "21:00", "10%",
    }  # fmt: skip
    unlabelled = Example("Express?", "Express costs $12.50 in 1 to 2 days.")
    assert expectation(unlabelled) == (("$12.50",), ("1",), ("2",))
    labelled = Example("Express?", "x", expect=(("$12.50", "12.50"),))
    assert expectation(labelled) == (("$12.50", "12.50"),)
    before = ["Hello! How can I help?", "Bye!"]
    assert simple_regressions(before, ["Hi there!", "Bye now."], ["Returns in 45 days."]) == 0
    assert simple_regressions(before, ["Returns take 45 days.", ""], ["Returns in 45 days."]) == 2


@pytest.fixture
async def store(tmp_path: Path, workload_path: Path) -> AsyncIterator[Store]:
    """The cloud's store after it answered every fact question of the workload correctly."""
    opened = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    token = await opened.create_enrollment_token()
    await opened.enroll_device(token, "dev_a", "A" * 43)
    kb = {}
    for line in (workload_path.parent / "northwind-kb.md").read_text().splitlines():
        if line.startswith("- ["):
            fact_id, text = line[3:].split("] ", 1)
            kb[fact_id] = text
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line]
    for n, row in enumerate(r for r in rows if r["class"] == "learnable_fact"):
        await opened.record_interaction(
            NewInteraction(
                device_id="dev_a", request_id=f"req_{n}", status="ok",
                messages=[{"role": "user", "content": row["text"]}], placeholders=[],
                answer=kb[row["fact"]], fact_ids=[row["fact"]], backend="knowledge",
            )
        )  # fmt: skip
    yield opened
    await opened.close()


@pytest.mark.slow
async def test_a_cycle_trains_measures_and_publishes_a_signed_bundle(
    store: Store, tmp_path: Path, workload_path: Path
) -> None:
    key = SigningKey.generate()
    config = DistillConfig(
        lora=LoraSettings(steps=3, batch_size=4, progress=False),
        expectations=expectations_from_workload(workload_path),
        min_gain=-1.0,  # a 3-step adapter need not be good; this test is about the mechanics
        eval_max_tokens=16,
        coverage_min_accuracy=0.0,
    )
    result = await distill(
        store, config=config, work_dir=tmp_path / "work", bundles_dir=tmp_path / "bundles",
        signing_key=key,
    )  # fmt: skip
    assert result.published and result.version == 1
    for name in ("heldout_accuracy_before", "heldout_accuracy_after", "simple_regressions",
                 "adapter_share_of_base", "train_examples"):  # fmt: skip
        assert name in result.metrics
    assert result.metrics["heldout_examples"] > 5
    assert result.metrics["adapter_share_of_base"] < 0.05
    record = await store.get_adapter(1)
    assert record is not None and record.state == "canary"
    manifest = verify_offer(
        record.offer, pinned_key=key.verify_key(),
        base_model_sha256=file_sha256(default_model_path()), current_version=None,
    )  # fmt: skip
    assert {f.name: f.kind for f in manifest.files} == {
        "adapter.gguf": "adapter", "coverage.json": "coverage",
    }  # fmt: skip
    assert manifest.metrics["heldout_accuracy_after"] == result.metrics["heldout_accuracy_after"]
    assert "incumbent_version" not in manifest.metrics  # nothing was on offer before it
    coverage = json.loads((record.directory / "coverage.json").read_text())["examples"]
    assert coverage and all(isinstance(q, str) and 0.0 <= a <= 1.0 for q, a in coverage)

    # The next cycle is measured against version 1, on offer now, on the same held-out
    # questions: greedy decoding with the same adapter file gives the same answers.
    again = await distill(
        store, config=config, work_dir=tmp_path / "work", bundles_dir=tmp_path / "bundles",
        signing_key=key, publish=False,
    )  # fmt: skip
    assert again.metrics["incumbent_version"] == 1.0
    assert again.metrics["heldout_accuracy_incumbent"] == result.metrics["heldout_accuracy_after"]
    assert again.metrics["heldout_accuracy_before"] == result.metrics["heldout_accuracy_before"]
    # An adapter on offer that cannot be measured cannot be replaced: said before training.
    (record.directory / "adapter.gguf").unlink()
    with pytest.raises(CloudAgentError, match="adapter of version 1, on offer now, is missing"):
        await distill(
            store, config=config, work_dir=tmp_path / "work", bundles_dir=tmp_path / "bundles",
            signing_key=key,
        )  # fmt: skip


async def test_too_little_data_trains_nothing(tmp_path: Path) -> None:
    opened = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    try:
        result = await distill(
            opened, config=DistillConfig(), work_dir=tmp_path / "w",
            bundles_dir=tmp_path / "b", signing_key=SigningKey.generate(),
        )  # fmt: skip
        assert not result.published and "fewer than" in result.reason
        assert await opened.list_rollouts() == []
    finally:
        await opened.close()


async def test_a_paraphrase_holding_personal_data_is_left_out(tmp_path: Path) -> None:
    opened = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    token = await opened.create_enrollment_token()
    await opened.enroll_device(token, "dev_a", "A" * 43)
    await opened.record_interaction(
        NewInteraction(
            device_id="dev_a", request_id="r1", placeholders=[], status="ok",
            messages=[{"role": "user", "content": "When is the hotline open?"}],
            answer="From 7:30 to 21:00.", fact_ids=["hotline"], backend="knowledge",
        )
    )  # fmt: skip

    async def paraphrase(train: list[Example]) -> list[Example]:
        return [
            Example("Until when can I phone support?", train[0].answer, source="paraphrase"),
            Example("Can I call 020 7946 0958 at 8?", train[0].answer, source="paraphrase"),
        ]

    said: list[str] = []
    try:
        result = await distill(
            opened, config=DistillConfig(phone_regions=("GB",), heldout_share=0.0),
            work_dir=tmp_path / "w", bundles_dir=tmp_path / "b",
            signing_key=SigningKey.generate(), progress=said.append, paraphraser=paraphrase,
        )  # fmt: skip
    finally:
        await opened.close()
    assert result.metrics["train_examples"] == 2, "the question and the clean paraphrase"
    assert any("'private_paraphrase': 1" in line for line in said), said
