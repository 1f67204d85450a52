"""The router: each signal, its reasons, the counts, and calibration to a local share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.privacy import Policy, Redactor
from edge_agent.router import SMALL_TALK, Coverage, IntentIndex, Router, Target, calibrate
from examples.kiosk.intents import KIOSK_INTENTS
from shared.pii import PiiKind


@pytest.fixture
def router() -> Router:
    intents = IntentIndex()
    for name, examples in KIOSK_INTENTS.items():
        intents.add(name, examples)
    return Router(intents)


def test_app_intents_stay_local_and_say_which_intent(router: Router) -> None:
    decision = router.decide("Could you show my cart?")
    assert decision.target is Target.LOCAL and decision.intent == "cart_show"
    assert decision.reasons == ("intent.cart_show",) and decision.scores["intent"] >= 0.5


def test_small_talk_stays_on_the_device_and_takes_no_store_question(workload_path: Path) -> None:
    intents = IntentIndex()
    for name, examples in SMALL_TALK.items():
        intents.add(name, examples)
    router = Router(intents)
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line]
    decisions = [(row, router.decide(row["text"])) for row in rows]
    # Kept for an intent, not for the personal data it carries.
    kept = [row for row, d in decisions if d.intent and d.reasons[0] == f"intent.{d.intent}"]
    assert {row["class"] for row in kept} == {"local_simple"}, [r["text"] for r in kept]
    assert {router.decide(t).intent for t in ("Hi there!", "Thanks, bye", "Who are you?")} == {
        "greet", "goodbye", "about_assistant",
    }  # fmt: skip


def test_open_hard_questions_go_to_the_cloud_with_the_cues_that_fired(router: Router) -> None:
    decision = router.decide(
        "Compare down and synthetic jackets and explain which is better in rain"
    )
    assert decision.target is Target.CLOUD
    assert {"intent.unknown", "difficulty.comparison", "difficulty.writing"} <= set(
        decision.reasons
    )
    assert "cloud" in decision.explain()


def test_personal_data_keeps_a_request_on_the_device(router: Router) -> None:
    assert router.decide("Update my phone number to (212) 555-0187").target is Target.LOCAL
    only = router.decide("My ID number is 11010519491231002X, please verify")
    assert only.target is Target.LOCAL_ONLY and only.reasons == ("privacy.local_only.cn_id",)
    hard = router.decide(
        "My card 4111 1111 1111 1111 was declined, explain why and compare options"
    )
    assert hard.target is Target.CLOUD and "privacy.redacted" in hard.reasons


def test_an_app_override_cannot_send_data_that_must_stay_on_the_device(router: Router) -> None:
    kept = router.decide("My ID number is 11010519491231002X, please verify", override=Target.CLOUD)
    assert kept.target is Target.LOCAL_ONLY
    assert kept.reasons == ("privacy.local_only.cn_id", "app.override.refused")
    # Data that leaves as a placeholder may go where the app says.
    card = router.decide("Check card 4111 1111 1111 1111", override=Target.CLOUD)
    assert card.target is Target.CLOUD and card.reasons == ("app.override",)


def test_a_national_id_earlier_in_the_conversation_keeps_the_request_on_the_device(
    router: Router,
) -> None:
    hard = "Compare down and synthetic jackets and explain which is better in rain"
    context = ["My SSN is 123-45-6789", "Thanks, noted."]
    decision = router.decide(hard, context=context)
    assert decision.target is Target.LOCAL_ONLY
    assert decision.reasons == ("privacy.local_only.ssn", "privacy.context")
    forced = router.decide(hard, context=context, override=Target.CLOUD)
    assert forced.target is Target.LOCAL_ONLY and "app.override.refused" in forced.reasons
    # Data that placeholders stand for does not: it goes redacted with the conversation.
    assert router.decide(hard, context=["Mail me at ann@example.com"]).target is Target.CLOUD
    # Turns are scanned once, for the redactor the router has: another one's policy counts.
    router.redactor = Redactor(policy={PiiKind.SSN: Policy.REDACT})
    assert router.decide(hard, context=context).target is Target.CLOUD


def test_the_link_and_back_pressure_turn_cloud_requests_into_local_fallbacks(
    router: Router,
) -> None:
    question = "Explain how to layer for ski touring versus resort skiing."
    assert router.decide(question, link_up=False).target is Target.LOCAL_FALLBACK
    assert router.decide(question, backpressure=True).reasons == ("cloud.backpressure",)
    assert router.decide(question, override=Target.LOCAL).reasons == ("app.override",)


def test_coverage_from_an_update_keeps_learned_requests_local(router: Router) -> None:
    question = "How long do I have to return a jacket?"
    assert router.decide(question).target is Target.CLOUD
    router.coverage = Coverage((("What is your return policy?", 0.9),
                                ("How many days do I have to return an item?", 0.9)))  # fmt: skip
    decision = router.decide(question)
    assert decision.target is Target.LOCAL and decision.reasons == ("coverage.match",)
    assert router.decide(question, device_busy=True).target is Target.CLOUD


def test_decisions_are_counted_per_target_and_reason(router: Router) -> None:
    router.decide("hello")
    router.decide("hello there")
    router.decide("Plan a two-week trek and then compare three tents", link_up=False)
    assert router.counts["local"] == 2 and router.counts["intent.greet"] == 2
    assert router.counts["local_fallback"] == 1 and router.counts["link.down"] == 1


@pytest.mark.parametrize("share", [0.4, 0.5, 0.7])
def test_calibration_reaches_a_target_local_share(
    router: Router, workload_path: Path, share: float
) -> None:
    texts = [json.loads(line)["text"] for line in workload_path.read_text().splitlines() if line]
    threshold = calibrate(router, texts, share)
    local = sum(router.decide(t).local for t in texts) / len(texts)
    assert abs(local - share) <= 0.05, (threshold, local)


def test_an_intent_of_the_local_only_privacy_class_never_leaves_the_device() -> None:
    intents = IntentIndex()
    intents.add("account", ["show my saved addresses", "change my password"], local_only=True)
    decision = Router(intents).decide("show my saved addresses please")
    assert decision.target is Target.LOCAL_ONLY and "privacy.intent" in decision.reasons


def test_the_calibrate_command_saves_a_threshold_the_agent_uses(
    tmp_path: Path, workload_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.cli import main

    intents = tmp_path / "intents.json"
    intents.write_text(json.dumps(KIOSK_INTENTS))
    args = ["edge", "calibrate", "--state-dir", str(tmp_path / "dev"), "--intents", str(intents),
            "--workload", str(workload_path), "--target-local-share", "0.5"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stay on the device" in out
    saved = json.loads((tmp_path / "dev" / "router.json").read_text())
    assert 0.0 < saved["threshold"] <= 1.5
