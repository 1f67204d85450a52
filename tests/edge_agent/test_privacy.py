"""Detection, policies, placeholders and restoration on the device, on the dev workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.config import EdgeConfig
from edge_agent.privacy import PlaceholderMap, Policy, Redactor, StreamRestorer
from shared.config import load_config
from shared.pii import PiiKind


def rows(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_listed_value_is_redacted_or_kept_local(workload_path: Path) -> None:
    redactor = Redactor()
    leaked = []
    for row in rows(workload_path):
        if row["class"] != "private":
            continue
        result = redactor.redact(row["text"], PlaceholderMap())
        for pii in row["pii"]:
            if result.may_leave_device and pii["value"] in result.text:
                leaked.append(row["id"])
    assert leaked == []


def test_at_most_two_percent_of_other_requests_are_flagged(workload_path: Path) -> None:
    redactor = Redactor()
    others = [r for r in rows(workload_path) if r["class"] != "private"]
    flagged = [r["id"] for r in others if redactor.redact(r["text"], PlaceholderMap()).kinds]
    assert len(flagged) <= 0.02 * len(others), flagged


def test_values_become_typed_placeholders_and_come_back() -> None:
    redactor, mapping = Redactor(), PlaceholderMap()
    result = redactor.redact(
        "Charge 4111 1111 1111 1111, mail jo@example.com, again jo@example.com", mapping
    )
    assert result.text == "Charge <CARD_1>, mail <EMAIL_1>, again <EMAIL_1>"
    assert result.placeholders == ("<CARD_1>", "<EMAIL_1>")
    answer = "I charged <CARD_1> and wrote to <EMAIL_1>; <UNKNOWN_9> stays."
    assert Redactor.restore(answer, mapping) == (
        "I charged 4111 1111 1111 1111 and wrote to jo@example.com; <UNKNOWN_9> stays."
    )


def test_policies_keep_national_ids_on_the_device_and_can_allow_kinds() -> None:
    result = Redactor().redact("My ID number is 11010519491231002X", PlaceholderMap())
    assert not result.may_leave_device and result.local_only == (PiiKind.CN_ID,)
    allowing = Redactor({PiiKind.EMAIL: Policy.ALLOW})
    assert allowing.redact("mail jo@example.com", PlaceholderMap()).text == "mail jo@example.com"


def test_reprs_show_names_and_kinds_never_values() -> None:
    mapping = PlaceholderMap()
    result = Redactor().redact("card 4111 1111 1111 1111", mapping)
    assert "4111" not in repr(mapping) and "4111" not in repr(result)
    assert "<CARD_1>" in repr(mapping)


@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=30))
def test_a_stream_restores_placeholders_split_anywhere(cuts: list[int]) -> None:
    mapping = PlaceholderMap()
    mapping.name_for(PiiKind.CARD, "4111 1111 1111 1111")
    mapping.name_for(PiiKind.CN_ID, "11010519491231002X")
    answer = "Card <CARD_1> is fine; 3 < 4 and <NATIONAL_ID_1> ok <b>bold</b> <CARD_1>"
    pieces, i = [], 0
    for cut in cuts:
        pieces.append(answer[i : i + cut])
        i += cut
    pieces.append(answer[i:])
    restorer = StreamRestorer(mapping)
    shown = "".join(restorer.feed(p) for p in pieces) + restorer.flush()
    assert shown == Redactor.restore(answer, mapping)
    assert "4111 1111 1111 1111" in shown and "<CARD_1>" not in shown


@pytest.mark.parametrize("text", ["a < b", "x <", "<", "<CARD_", "value <CARD_1"])
def test_a_stream_never_loses_text_that_is_not_a_placeholder(text: str) -> None:
    restorer = StreamRestorer(PlaceholderMap())
    assert "".join(restorer.feed(ch) for ch in text) + restorer.flush() == text


def test_a_region_phone_numbers_cannot_be_read_in_is_refused() -> None:
    with pytest.raises(ValueError, match="'XX'"):
        Redactor(phone_regions=("GB", "XX"))
    with pytest.raises(ValidationError, match="use 'GB'"):
        EdgeConfig(phone_regions=("UK",))
    uk = Redactor(phone_regions=EdgeConfig(phone_regions=("gb",)).phone_regions)
    assert uk.redact("Call 020 7946 0958", PlaceholderMap()).text == "Call <PHONE_1>"
    # As an environment variable sets it: a string of codes.
    env = {"EDGELOOP_EDGE__PHONE_REGIONS": "GB,US"}
    config = load_config(EdgeConfig, env=env, prefix="EDGELOOP_EDGE__")
    assert config.phone_regions == ("GB", "US")


def test_a_text_seen_again_is_not_scanned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # A conversation's earlier turns come with every request: each is scanned once.
    import edge_agent.privacy as privacy

    calls: list[str] = []
    real = privacy.detect

    def counting(text: str, *args: object, **kw: object) -> list[privacy.Finding]:
        calls.append(text)
        return real(text, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(privacy, "detect", counting)
    redactor = Redactor()
    turns = ["Mail ann@example.com", "Noted.", "And my SSN is 123-45-6789"]
    for _ in range(3):
        redactions = [redactor.redact(t, PlaceholderMap()) for t in turns]
    assert calls == turns
    assert redactions[0].text == "Mail <EMAIL_1>" and redactions[2].local_only == (PiiKind.SSN,)
