"""The structured personal-data detector, on the dev workload and on edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.pii import (
    PiiKind,
    check_phone_regions,
    cn_id_valid,
    detect,
    iban_valid,
    luhn_valid,
)


def rows(workload_path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in workload_path.read_text().splitlines() if line.strip()]


def test_every_listed_value_in_the_workload_is_caught_with_its_kind(workload_path: Path) -> None:
    missed = []
    for row in rows(workload_path):
        if row["class"] != "private":
            continue
        findings = detect(row["text"])
        for pii in row["pii"]:
            if not any(f.value == pii["value"] and f.kind.value == pii["kind"] for f in findings):
                missed.append((row["id"], pii["kind"]))
    assert missed == []


def test_at_most_two_percent_of_non_private_requests_are_flagged(workload_path: Path) -> None:
    others = [r for r in rows(workload_path) if r["class"] != "private"]
    flagged = [r["id"] for r in others if detect(r["text"])]
    assert len(flagged) <= 0.02 * len(others), flagged


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("ssn 123-45-6789 please", PiiKind.SSN),
        ("server at 192.168.10.4 is down", PiiKind.IP),
        ("v6 2001:db8::8a2e:370:7334 works", PiiKind.IP),
        ("mail a.b+c@sub.example.org now", PiiKind.EMAIL),
        ("call +49 30 901820", PiiKind.PHONE),
        ("deliver to 742 Evergreen Terrace, Springfield, OR 97475", PiiKind.ADDRESS),
    ],
)
def test_other_kinds_are_detected(text: str, kind: PiiKind) -> None:
    assert [f.kind for f in detect(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111 1111 1111 1112 arrived",  # fails Luhn
        "ssn 000-12-3456",  # invalid area
        "version 1.2.3.4000 released",
        "Room 12, level 3",
        "Tents cost $18 per day with a $100 deposit",
        "ID 440304199003074618",  # wrong check digit
    ],
)
def test_lookalikes_that_fail_validation_are_not_flagged(text: str) -> None:
    assert detect(text) == []


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB29NWBK60161331926819") and not iban_valid("GB28NWBK60161331926819")
    assert cn_id_valid("11010519491231002X") and not cn_id_valid("110105194912310021")


def test_findings_do_not_show_values_in_their_repr() -> None:
    [finding] = detect("card 4111 1111 1111 1111")
    assert "4111" not in repr(finding) and finding.value == "4111 1111 1111 1111"


def test_phone_regions_must_be_codes_phonenumbers_knows() -> None:
    assert check_phone_regions(["gb", " US "]) == ("GB", "US")
    with pytest.raises(ValueError, match="'UK' is not a region code.*use 'GB'"):
        check_phone_regions(["UK"])  # found nothing at all: a silent leak of every number
    with pytest.raises(ValueError, match="at least one"):
        check_phone_regions([])
    # A string is codes separated by commas or spaces, never letters ('G', 'B').
    assert check_phone_regions("GB") == ("GB",)
    assert check_phone_regions("us, in") == ("US", "IN")
    with pytest.raises(ValueError, match="expected region codes"):
        check_phone_regions(44)  # type: ignore[arg-type]
