"""Privacy on the device: detect personal data, apply a policy per kind, replace values with
typed placeholders before anything leaves the device, and put them back into the answer.

Policies, per kind of personal data:

- ``local_only``: the request never leaves the device (national ids by default);
- ``redact``: the request may go to the cloud with placeholders such as ``<CARD_1>``;
- ``allow``: the value may leave the device as it is.

The placeholder-to-value map (`PlaceholderMap`) lives on the device only. Its repr, and every
error message here, shows placeholder names and kinds, never values. Restoring works on whole
answers and on streams, where a placeholder can be split across deltas (`StreamRestorer`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocol import PLACEHOLDER
from shared.pii import Finding, PiiKind, check_phone_regions, detect

__all__ = [
    "DEFAULT_POLICY",
    "PlaceholderMap",
    "Policy",
    "Redaction",
    "Redactor",
    "StreamRestorer",
]


class Policy(StrEnum):
    LOCAL_ONLY = "local_only"
    REDACT = "redact"
    ALLOW = "allow"


DEFAULT_POLICY: Mapping[PiiKind, Policy] = {
    PiiKind.EMAIL: Policy.REDACT,
    PiiKind.PHONE: Policy.REDACT,
    PiiKind.CARD: Policy.REDACT,
    PiiKind.IBAN: Policy.REDACT,
    PiiKind.SSN: Policy.LOCAL_ONLY,
    PiiKind.CN_ID: Policy.LOCAL_ONLY,
    PiiKind.IP: Policy.REDACT,
    PiiKind.ADDRESS: Policy.REDACT,
}

_LABEL = {
    PiiKind.EMAIL: "EMAIL",
    PiiKind.PHONE: "PHONE",
    PiiKind.CARD: "CARD",
    PiiKind.IBAN: "IBAN",
    PiiKind.SSN: "SSN",
    PiiKind.CN_ID: "NATIONAL_ID",
    PiiKind.IP: "IP",
    PiiKind.ADDRESS: "ADDRESS",
}
_LONGEST = 2 + 24 + 1 + 4  # the longest text a placeholder can be
SCAN_CACHE = 256
"""Texts whose findings a `Redactor` keeps."""


@dataclass
class PlaceholderMap:
    """Placeholder name to value, for one conversation; the same value keeps its name."""

    _values: dict[str, str] = field(default_factory=dict)
    _names: dict[tuple[PiiKind, str], str] = field(default_factory=dict)
    _counts: dict[PiiKind, int] = field(default_factory=dict)

    def name_for(self, kind: PiiKind, value: str) -> str:
        key = (kind, value)
        if key not in self._names:
            n = self._counts.get(kind, 0) + 1
            self._counts[kind] = n
            name = f"<{_LABEL[kind]}_{n}>"
            self._names[key] = name
            self._values[name] = value
        return self._names[key]

    def value(self, name: str) -> str | None:
        return self._values.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PlaceholderMap({', '.join(self._values) or 'empty'})"


@dataclass(frozen=True)
class Redaction:
    """The outcome of redacting one text."""

    text: str
    """The text with every `redact` value replaced by its placeholder."""
    kinds: tuple[PiiKind, ...]
    """Kinds of personal data found (any policy)."""
    local_only: tuple[PiiKind, ...]
    """Kinds found whose policy keeps the request on the device."""
    placeholders: tuple[str, ...]
    """Placeholder names used in `text`."""

    @property
    def may_leave_device(self) -> bool:
        return not self.local_only

    def __repr__(self) -> str:
        kinds = ",".join(k.value for k in self.kinds)
        return f"Redaction(kinds=[{kinds}], local_only={bool(self.local_only)})"


class Redactor:
    """Applies a per-kind policy to personal data found in text.

    `phone_regions`: where numbers written without a ``+`` country code are read (a UK kiosk
    says ``("GB",)``); numbers with a country code are found whatever the region.
    """

    def __init__(
        self,
        policy: Mapping[PiiKind, Policy] | None = None,
        *,
        phone_regions: tuple[str, ...] = ("US",),
    ) -> None:
        self.policy = dict(DEFAULT_POLICY)
        if policy:
            self.policy.update(policy)
        # An unknown region would find no phone number at all: refused here (ValueError).
        self.phone_regions = check_phone_regions(phone_regions)
        self._scans: OrderedDict[str, list[Finding]] = OrderedDict()
        """Recent texts -> their findings: a conversation's earlier turns come with every
        request, and each is scanned once (the policy is applied after the scan)."""

    def scan(self, text: str) -> list[Finding]:
        found = self._scans.get(text)
        if found is None:
            found = detect(text, self.policy, phone_regions=self.phone_regions)
            self._scans[text] = found
            if len(self._scans) > SCAN_CACHE:
                self._scans.popitem(last=False)
        else:
            self._scans.move_to_end(text)
        return found

    def redact(self, text: str, placeholders: PlaceholderMap) -> Redaction:
        findings = self.scan(text)
        pieces: list[str] = []
        used: list[str] = []
        last = 0
        for finding in findings:
            if self.policy[finding.kind] is not Policy.REDACT:
                continue
            name = placeholders.name_for(finding.kind, finding.value)
            pieces += [text[last : finding.start], name]
            used.append(name)
            last = finding.end
        pieces.append(text[last:])
        kinds = tuple(dict.fromkeys(f.kind for f in findings))
        local = tuple(k for k in kinds if self.policy[k] is Policy.LOCAL_ONLY)
        return Redaction("".join(pieces), kinds, local, tuple(dict.fromkeys(used)))

    @staticmethod
    def restore(text: str, placeholders: PlaceholderMap) -> str:
        """Put the values back; unknown placeholder-like text is left as it is."""

        def value(match: re.Match[str]) -> str:
            found = placeholders.value(match.group())
            return found if found is not None else match.group()

        return PLACEHOLDER.sub(value, text)

    def kinds_in(self, texts: Iterable[str]) -> set[PiiKind]:
        return {f.kind for t in texts for f in self.scan(t)}


class StreamRestorer:
    """Restores placeholders in a stream of deltas, even when one is split across deltas.

    `feed` returns what can be shown now; text that might be the start of a placeholder is
    held back until the next delta (or `flush`) decides it.
    """

    def __init__(self, placeholders: PlaceholderMap) -> None:
        self.placeholders = placeholders
        self._held = ""

    def feed(self, delta: str) -> str:
        text = self._held + delta
        cut = text.rfind("<")
        if cut != -1 and ">" not in text[cut:] and len(text) - cut < _LONGEST:
            self._held, text = text[cut:], text[:cut]
        else:
            self._held = ""
        return Redactor.restore(text, self.placeholders)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return Redactor.restore(text, self.placeholders)
