"""The kiosk demo end to end on a small slice of the workload (tiny training): it runs the
whole loop and reports every figure; the full-size run is `edgeloop demo` itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")

from edge_agent.privacy import DEFAULT_POLICY, Policy  # noqa: E402
from examples.kiosk.demo import DEFAULT_WORKLOAD, run_demo  # noqa: E402
from shared.pii import PiiKind  # noqa: E402

pytestmark = pytest.mark.slow


async def test_the_demo_plays_learns_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.loads(line) for line in DEFAULT_WORKLOAD.read_text().splitlines()]
    picked = []
    for kind, n in (("learnable_fact", 24), ("local_simple", 3), ("private", 3),
                    ("cloud_complex", 2)):  # fmt: skip
        picked += [r for r in rows if r["class"] == kind][:n]
    workload = tmp_path / "slice.jsonl"
    workload.write_text("\n".join(json.dumps(r) for r in picked))
    figures = await run_demo(
        workload, work_dir=tmp_path / "demo", steps=4, paraphrases=False,
        compare_cloud_only=True, json_path=tmp_path / "figures.json",
    )  # fmt: skip
    assert json.loads((tmp_path / "figures.json").read_text()) == figures
    for name in ("before", "after", "cloud_only"):
        assert figures[name]["requests"] == len(picked)
        assert figures[name]["raw_pii_at_cloud"] == 0
    # The third pass sends everything, the greetings and the private requests too (redacted),
    # except what must stay on the device (national ids), and costs the cloud more than the
    # kiosk that answers them itself.
    kept = [r for r in picked if any(DEFAULT_POLICY[PiiKind(p["kind"])] is Policy.LOCAL_ONLY
                                     for p in r.get("pii", []))]  # fmt: skip
    assert kept, "the slice has a request that must stay on the device"
    assert figures["cloud_only"]["share_on_device"] == round(len(kept) / len(picked), 4)
    assert figures["cloud_only"]["cloud_tokens"] > figures["after"]["cloud_tokens"]
    assert figures["distill"]["train_examples"] >= 8
    assert "heldout_accuracy_after" in figures["distill"]
    # The cloud's view from the kiosk's routing reports agrees with the passes (the third,
    # a comparison, is left out of them), split by the adapter that answered.
    reported = figures["reported_routing"]
    assert reported["devices"] == 1 and reported["routes"]["total"] == 2 * len(picked)
    by_version = {v["adapter_version"]: v for v in reported["by_adapter_version"]}
    passes = [figures["before"], figures["after"]]
    if len(by_version) == 2:  # a bundle was published and applied between the passes
        assert [v["total"] for v in by_version.values()] == [len(picked), len(picked)]
        assert [round(v["on_device_share"], 4) for v in by_version.values()] == [
            p["share_on_device"] for p in passes
        ]
    else:
        assert list(by_version) == [None]
    assert reported["routes"]["cloud"] == sum(
        p["requests"] - round(p["share_on_device"] * p["requests"]) for p in passes
    )
    out = capsys.readouterr().out
    assert "as the cloud sees it from the kiosk's routing reports: base model" in out
    assert "answered on the device" in out and "raw PII values seen by the cloud" in out
    assert f"adapter: {figures['distill']['adapter']}" in out
    assert f"{figures['distill']['heldout_examples']:.0f} held-out questions" in out
    assert "cloud only (every request sent" in out and "fewer cloud tokens" in out


async def test_with_two_turns_the_knowledge_grows_and_each_turn_is_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.loads(line) for line in DEFAULT_WORKLOAD.read_text().splitlines()]
    picked, facts = [], set()
    for row in rows:  # one question on each fact, and a few of the other kinds
        if row["class"] == "learnable_fact" and row["fact"] not in facts:
            facts.add(row["fact"])
            picked.append(row)
    for kind, n in (("local_simple", 2), ("private", 2), ("cloud_complex", 1)):
        picked += [r for r in rows if r["class"] == kind][:n]
    workload = tmp_path / "slice.jsonl"
    workload.write_text("\n".join(json.dumps(r) for r in picked))
    figures = await run_demo(
        workload, work_dir=tmp_path / "demo", steps=4, paraphrases=False,
        compare_cloud_only=False, turns=2,
    )  # fmt: skip
    first, second = figures["turns"]
    assert (first["knowledge_facts"], second["knowledge_facts"]) == (10, 20)
    assert figures["before"] == first["played"] and "cloud_only" not in figures

    def right(played: dict[str, list[int]]) -> int:
        return played["fact_accuracy_cloud"][0] + played["fact_accuracy_device"][0]

    # The first turn's cloud knows half of the store's facts; the questions on the other half
    # are answered right only once the knowledge base has them.
    assert right(first["played"]) <= 12 < right(second["played"])
    reported = figures["reported_routing"]
    assert reported["routes"]["total"] == 3 * len(picked)
    out = capsys.readouterr().out
    assert "after turn 1" in out and "after turn 2" in out
    assert "turn 1, adapter:" in out and "turn 2, adapter:" in out
