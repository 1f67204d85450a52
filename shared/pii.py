"""Detection of structured personal data in text.

Kinds: e-mail addresses, phone numbers (`phonenumbers`), payment cards (Luhn), IBANs (mod 97),
US social security numbers, Chinese resident identity numbers (ISO 7064 check digit), IP
addresses (`ipaddress`), and postal addresses (US and UK shapes). Each candidate is validated,
not just pattern-matched, to keep false alarms rare.

A `Finding` holds the raw value so the device can build its placeholder map; nothing here logs
or prints it, and `repr(Finding)` hides it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

import phonenumbers
from pydantic import BeforeValidator

__all__ = [
    "Finding",
    "PhoneRegions",
    "PiiKind",
    "check_phone_regions",
    "cn_id_valid",
    "detect",
    "iban_valid",
    "luhn_valid",
]


class PiiKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CARD = "credit_card"
    IBAN = "iban"
    SSN = "ssn"
    CN_ID = "cn_id"
    IP = "ip"
    ADDRESS = "address"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: PiiKind
    start: int
    end: int
    value: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Finding({self.kind.value}, {self.start}:{self.end})"


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_CN_ID = re.compile(r"(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4})*(?![\w:])"
)
_STREET = (
    r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|"
    r"Terrace|Crescent|Close|Square|Sq|Highway|Hwy|Parkway|Pkwy|Kingsway)\.?"
)
_US_ADDRESS = re.compile(
    rf"\b\d{{1,6}}(?: [A-Z][a-z]+){{1,3}} {_STREET}(?:,? (?:Apt|Suite|Unit) \w+)?"
    r"(?:, [A-Z][a-z]+(?: [A-Z][a-z]+)*)?,? [A-Z]{2} \d{5}(?:-\d{4})?\b"
)
_UK_ADDRESS = re.compile(
    r"\b(?:(?:Flat|Apartment|Unit) \w+, )?\d{1,5}[A-Za-z]?(?: [A-Z][a-z]+){1,3}, "
    r"[A-Z][a-z]+(?: [A-Z][a-z]+)*,? [A-Z]{1,2}\d[A-Z\d]? \d[A-Z]{2}\b"
)
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def cn_id_valid(value: str) -> bool:
    value = value.upper()
    if len(value) != 18 or not value[:17].isdigit():
        return False
    year, month, day = int(value[6:10]), int(value[10:12]), int(value[12:14])
    if not (1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    check = _CN_CHECK[sum(int(d) * w for d, w in zip(value[:17], _CN_WEIGHTS, strict=True)) % 11]
    return value[17] == check


def _ssn_valid(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _cards(text: str) -> Iterable[Finding]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            yield Finding(PiiKind.CARD, m.start(), m.end(), m.group())


def _ibans(text: str) -> Iterable[Finding]:
    for m in _IBAN.finditer(text):
        raw = m.group()
        # The pattern may run into a following word; keep the longest prefix that validates.
        for end in range(len(raw), 14, -1):
            candidate = raw[:end].rstrip()
            if iban_valid(candidate.replace(" ", "")):
                yield Finding(PiiKind.IBAN, m.start(), m.start() + len(candidate), candidate)
                break


_REGION_MIXUPS = {"UK": "GB", "EL": "GR"}
"""Codes people write that are not ISO 3166 region codes, and the code they mean."""


def check_phone_regions(regions: str | Iterable[str]) -> tuple[str, ...]:
    """`regions` as the upper-case region codes phone numbers are read in, or ValueError
    naming one that phonenumbers does not know: an unknown region finds no number at all, so
    a mistyped one would let every national-format number through unseen. A string holds
    codes separated by commas or spaces (``"GB"``, ``"US,IN"``, as an environment variable
    sets them), never read letter by letter."""
    if isinstance(regions, str):
        regions = [code for code in re.split(r"[\s,]+", regions) if code]
    elif not isinstance(regions, Iterable):
        raise ValueError(f"expected region codes such as ['US', 'GB'], not {regions!r}")
    codes = tuple(str(r).strip().upper() for r in regions)
    if not codes:
        raise ValueError("at least one phone region is needed, e.g. ('US',)")
    for code in codes:
        if code not in phonenumbers.SUPPORTED_REGIONS:
            hint = (
                f"; for that country use {_REGION_MIXUPS[code]!r}" if code in _REGION_MIXUPS else ""
            )
            raise ValueError(f"{code!r} is not a region code for phone numbers{hint}")
    return codes


PhoneRegions = Annotated[tuple[str, ...], BeforeValidator(check_phone_regions)]
"""A configuration field of phone regions: a list of codes, or a string of them ("US,IN", as
an environment variable gives it), checked by `check_phone_regions`."""


def _phones(text: str, regions: tuple[str, ...]) -> Iterable[Finding]:
    seen: set[tuple[int, int]] = set()
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, phonenumbers.Leniency.VALID):
            span = (match.start, match.end)
            if span not in seen:
                seen.add(span)
                yield Finding(PiiKind.PHONE, match.start, match.end, match.raw_string)


def _ips(text: str) -> Iterable[Finding]:
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            yield Finding(PiiKind.IP, m.start(), m.end(), m.group())


def detect(
    text: str,
    kinds: Iterable[PiiKind] | None = None,
    *,
    phone_regions: tuple[str, ...] = ("US",),
) -> list[Finding]:
    """Every validated finding in `text`, by position; overlaps keep the longer (earlier) one.

    `phone_regions` are the regions numbers without a ``+`` prefix are read in.
    """
    # Cheap gates first: every kind but e-mail needs digits, e-mail needs an "@". Most text
    # has neither, and returns before any set of kinds is built (hashing an enum member runs
    # Python code: the sets cost more than the scan).
    digits = sum(map(str.isdigit, text))
    if not digits and "@" not in text:
        return []
    wanted = set(PiiKind) if kinds is None else set(kinds)
    if digits < 4:
        wanted &= {PiiKind.EMAIL, PiiKind.ADDRESS} if digits else {PiiKind.EMAIL}
    if "@" not in text:
        wanted.discard(PiiKind.EMAIL)
    if digits < 7:
        wanted -= {PiiKind.PHONE, PiiKind.CARD, PiiKind.IBAN, PiiKind.SSN, PiiKind.CN_ID}
    found: list[Finding] = []
    if not wanted:
        return found
    if PiiKind.EMAIL in wanted:
        found += [
            Finding(PiiKind.EMAIL, m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)
        ]
    if PiiKind.CARD in wanted:
        found += _cards(text)
    if PiiKind.IBAN in wanted:
        found += _ibans(text)
    if PiiKind.SSN in wanted:
        found += [
            Finding(PiiKind.SSN, m.start(), m.end(), m.group())
            for m in _SSN.finditer(text)
            if _ssn_valid(*m.groups())
        ]
    if PiiKind.CN_ID in wanted:
        found += [
            Finding(PiiKind.CN_ID, m.start(), m.end(), m.group())
            for m in _CN_ID.finditer(text)
            if cn_id_valid(m.group())
        ]
    if PiiKind.IP in wanted:
        found += _ips(text)
    if PiiKind.ADDRESS in wanted:
        for pattern in (_US_ADDRESS, _UK_ADDRESS):
            found += [
                Finding(PiiKind.ADDRESS, m.start(), m.end(), m.group())
                for m in pattern.finditer(text)
            ]
    if PiiKind.PHONE in wanted:
        found += _phones(text, phone_regions)
    # Resolve overlaps: a card number is not also a phone number.
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for finding in found:
        if kept and finding.start < kept[-1].end:
            continue
        kept.append(finding)
    return kept
